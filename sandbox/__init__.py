"""sandbox: run one tool call in a child process that cannot get out. Imports nothing of
Astra's other layers.

What it owns:

- ``policy``: :class:`Policy`, what a call may do (profile, limits, files, environment).
- ``seccomp``: the allowlist filter of each profile, compiled once in the parent.
- ``landlock``: the filesystem/TCP/signal fence, through raw syscalls.
- ``lockdown``: the child's ordered lockdown steps.
- ``runner``: :class:`Runner` (a fresh child per call): spawning, collecting, classifying.
- ``child``: the child's side of a call, and the reply records it sends back.
- ``pool``: :class:`WarmPool`, children forked and locked down ahead of time, one call each.
- ``errors``: :class:`SandboxError` and the typed outcomes.

Threat model
============

The code of a call is hostile: model-written Python, a shell command, a parser fed an
untrusted file. It runs with the parent's uid (or, as root, with the shell profiles, as
``ASTRA_SANDBOX_UID``). It must not:

1. reach the network (``python``, ``shell``), another process (the kernel, its workers,
   other agents), or the kernel's shared memory;
2. read or change files outside its workdir and the read-only paths its profile needs;
3. outlive its limits: CPU, memory, wall time, processes, file bytes, output bytes;
4. take the machine down: fork bombs, disk fills and output floods are capped;
5. learn the parent's secrets from its environment, its fds or ``/proc``;
6. use the kernel's riskier interfaces (io_uring, bpf, userfaultfd, keyrings, namespaces,
   ptrace, 32-bit syscall tables), where a kernel bug would turn into an escape.

Out of scope: kernel exploits through the syscalls a profile allows; side channels;
secrets the parent holds in *memory* when it forks (make pools before loading them); a
``network`` call's use of the network it was given.

The layers, in the order the child applies them, and why that order
===================================================================

seccomp alone is not a boundary: on this machine a root or same-uid child still opened
the supervisor's ``/proc/<pid>/mem`` read-write and read /etc/shadow with every "dangerous"
syscall denied (NOTES.md). Each layer covers what the others cannot see:

1. *Session and lifeline.* ``setsid``: the call's processes form one group that one
   ``killpg`` ends. A pipe held only by the parent, ``O_ASYNC`` with ``F_SETSIG=SIGKILL``
   on the group: if the parent dies, the kernel kills the sandbox.
2. *Descriptors.* Only stdin (/dev/null), the capture pipes, the call, reply and lifeline
   pipes stay open: no ring, socket or journal of the parent's is reachable.
3. *Environment.* Replaced, and the exec-time block fork copied is zeroed.
4. *Identity and namespaces* (before anything that needs privileges is dropped): as root,
   the shell profiles switch uid; then a mount namespace (plus a user namespace if not
   root) and a network namespace (unless ``network``): the workdir becomes a tmpfs of
   ``max_file_bytes``; empty tmpfs hide ``/proc`` and ``/dev/shm``; no interface but a
   down loopback.
5. *Limits.* rlimits after the user namespace (so RLIMIT_NPROC counts this sandbox's
   processes only), then every capability dropped (root's, or those the namespace gave).
6. *no_new_privs*, then *Landlock*, then *seccomp*, last because it denies the syscalls
   of every earlier step (unshare, mount, setuid, landlock_*); Landlock needs
   no_new_privs first.

Each denial has a typed outcome: a denied syscall raises :class:`SandboxViolation` naming
it (its errno is ``3000 + nr``); a foreign ABI kills the process with SIGSYS (also a
``SandboxViolation``); Landlock answers ``PermissionError``; hidden ``/proc`` and
``/dev/shm`` answer ``FileNotFoundError``; limits answer :class:`SandboxTimeout`,
:class:`SandboxMemoryError`, ``OSError`` (EFBIG, ENOSPC) or ``Cannot fork``; a crash is
:class:`SandboxCrashed`.

Protocols
=========

1. *Spawn, call, reply, collect, classify*: ``sandbox/runner.py`` (numbered steps 1-5, and
   the data-flow diagram of its pipes).
2. *Lockdown*: ``sandbox/lockdown.py`` (steps 1-6 above, in code order).
3. *Filter compilation*: ``sandbox/seccomp.py`` (rules of construction 1-6).

The weaker modes: what is given up without a layer
==================================================

The runner applies what the kernel and uid permit and reports it in
``SandboxResult.layers``; nothing fails because a layer is missing.

- *No Landlock* (kernel without it, or ``ASTRA_SANDBOX_LANDLOCK=0``; the runner emits a
  :class:`SandboxWarning`): files are fenced only by DAC and the namespaces. The call can
  read whatever its uid can (as root in the ``python`` profile, which keeps uid 0 when the
  interpreter lives where only root can read it: /etc/shadow), and write outside a
  fresh workdir; abstract UNIX sockets are fenced by the network namespace only; the shell
  profiles may signal only their own process group (seccomp) instead of any of their own
  processes.
- *No namespaces* (unprivileged without user namespaces): ``/proc`` and ``/dev/shm`` stay
  visible, so with Landlock also missing a same-uid call can open the parent's
  ``/proc/<pid>/mem``; the workdir is no tmpfs, so ``max_file_bytes`` caps each file but
  not their total; RLIMIT_NPROC counts every process of the uid.
- *No root*: shell calls run as the caller's uid, not ``ASTRA_SANDBOX_UID``.

Cross-package API (``__all__``): ``Policy``, ``Runner``, ``WarmPool``, the results and
the errors. ``kernel`` imports from here, never from the modules.
"""

from __future__ import annotations

from .errors import (
    RemoteTraceback,
    SandboxCallError,
    SandboxCrashed,
    SandboxError,
    SandboxMemoryError,
    SandboxTimeout,
    SandboxViolation,
    SandboxWarning,
)
from .policy import PROFILES, Policy, Profile
from .pool import PoolStatistics, WarmPool
from .runner import Runner, SandboxResult

__all__ = [
    "PROFILES",
    "Policy",
    "PoolStatistics",
    "Profile",
    "RemoteTraceback",
    "Runner",
    "SandboxCallError",
    "SandboxCrashed",
    "SandboxError",
    "SandboxMemoryError",
    "SandboxResult",
    "SandboxTimeout",
    "SandboxViolation",
    "SandboxWarning",
    "WarmPool",
]
