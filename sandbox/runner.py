"""Running one call in a sandboxed child: cold (fork per call) or from a warm pool.

``Runner.call(fn, *args)`` forks a child that locks itself down (``lockdown.py``), runs the
call, replies and exits; the parent collects the reply, the output and the exit status, and
returns a :class:`SandboxResult` or raises a typed ``SandboxError``. ``WarmPool``
(``pool.py``) forks its children ahead of time, already locked down, each waiting for
exactly one call:

    parent (runner.py)                       child (child.py; one call, then gone)
    ------------------                       -------------------------------------
    fork ----------------------------------> lock down (lockdown.py, steps 1-6)
         <-- reply pipe: Locked(layers) ---- (a warm child now blocks reading fd 3)
    cloudpickle(call) --- call pipe -------> run the call
         <-- stdout / stderr pipes --------- output, as it is written
         <-- reply pipe: Reply(value | failure)
    pidfd readable: exited -> killpg, drain, wait4, remove the workdir

Protocol, and what makes each step correct:

1. *Spawn.* Pipes are made ``O_CLOEXEC`` and the child dups its ends to fds 0-4, closing
   everything else, so no other call's pipe stays open in it (an open write end would
   delay the other call's EOF).
2. *Call.* A cold child runs the function from the memory fork gave it (nothing pickled);
   a warm child reads one length-prefixed cloudpickle frame. Pickle flows only from the
   parent (trusted) to the child.
3. *Reply.* Frames of ``child.Locked`` then ``child.Reply`` (``sandbox/child.py``),
   decoded with msgspec into plain data only. The parent never unpickles what a child
   wrote: a sandboxed call could otherwise run code in the parent. Return values must be
   plain data (msgspec-encodable); exceptions are rebuilt from a name only when they are
   built-in exception types.
4. *Collect.* One ``poll`` over the reply and output pipes and the child's pidfd, until the
   deadline. When the child exits, its process group is killed (nothing it started outlives
   the call) and the pipes are drained to EOF. At the deadline, the group is killed and the
   call is a :class:`SandboxTimeout`. The leader is reaped last (``wait4``, which gives the
   CPU time and peak RSS): until then its pid, which is also the group id, cannot be
   reused, so ``killpg`` never hits a stranger. A warm ``python``-profile child (which
   cannot have started processes) is done once its reply is in and its pipes are closed:
   the pool returns then and its keeper thread reaps it, so a call does not wait for the
   child's memory and namespaces to be torn down.
5. *Classify.* A reply wins; otherwise the wait status decides: SIGXCPU (or SIGKILL past
   the CPU limit) is a CPU timeout, SIGSYS a violation from a foreign ABI, any other
   signal a crash; a shell's exit code is its value.

A warm child counts its wall time from the call's dispatch. It rehearses a call before it
reports Locked (``child._rehearse``), so the call takes few copy-on-write faults; a pool
forks its replacement once the call is over (``pool.py``), so the fork does not compete
with the call.

If the parent process dies, the kernel kills every sandbox it started (the lifeline,
``lockdown.py`` step 1), whichever thread forked them. Children inherit the parent's
memory: make pools (and cold calls) before loading secrets you would not hand to the
sandboxed code (environment variables are scrubbed; other memory is not).
XX: a zygote process forked at startup would lift that caveat and take the forks off the
parent: their page-table copies (which hold the GIL) and the copy-on-write faults each
leaves the parent (~160 per warm call here, ~0.2 ms), at the price of an fd-passing hop
per spawn, and of children that no longer see what the parent imported after startup.
"""

from __future__ import annotations

__all__ = [
    "READ_CHUNK",
    "Child",
    "Runner",
    "SandboxResult",
    "Template",
    "check_shell",
    "cleanup_stale_workdirs",
    "finish",
    "reap",
    "rebuild",
]

import builtins
import contextlib
import dataclasses
import os
import select
import shutil
import signal
import tempfile
import threading
import time
import warnings
from typing import TYPE_CHECKING, Any, Final

from . import landlock, seccomp
from .child import (
    EXIT_NO_MEMORY,
    EXIT_NO_REPLY,
    Call,
    Failure,
    Locked,
    Reply,
    child_main,
    parse_frames,
)
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
from .lockdown import Plan, base_rules, root_sandbox_uid
from .policy import Policy

if TYPE_CHECKING:
    from collections.abc import Callable

#: Largest reply (return value or error) a child may send; a bigger one kills the call.
MAX_REPLY_BYTES: Final = int(os.getenv("ASTRA_SANDBOX_MAX_REPLY_BYTES", 64 << 20))
#: After a kill (timeout, or the leader's exit), how long to drain the pipes at most.
KILL_GRACE_S: Final = float(os.getenv("ASTRA_SANDBOX_KILL_GRACE_S", 5.0))
#: Where fresh workdirs are made (the system temp dir by default).
WORKDIR_ROOT: Final = os.getenv("ASTRA_SANDBOX_WORKDIR_ROOT") or None
#: Fresh workdirs are named ``astra-tool-<creator pid>-<random>``.
_WORKDIR_PREFIX: Final = "astra-tool-"

#: Bytes read from a pipe per wake-up: a pipe's default capacity, so one read drains it.
READ_CHUNK: Final = 1 << 16


# ---- Results ----


@dataclasses.dataclass(frozen=True, slots=True)
class SandboxResult:
    """What a sandboxed call produced. Also attached, with ``value=None``, as ``.result`` of
    the ``SandboxError`` a failed call raises."""

    value: Any  # the return value (plain data); a shell command's exit code
    stdout: bytes  # at most Policy.max_output_bytes
    stderr: bytes
    stdout_truncated: bool  # more was written, read and dropped
    stderr_truncated: bool
    duration_s: float  # from spawn (cold) or dispatch (warm) to reaping
    cpu_s: float  # user + system CPU of the child (not of processes it left behind)
    peak_rss_kb: int  # the child's peak resident set, including what fork shared
    exit_code: int | None  # None when killed by a signal
    layers: frozenset[str]  # what the lockdown applied: "landlock7", "netns", "seccomp", ...
    pid: int  # the child's pid, also its process group id

    @property
    def truncated(self) -> bool:
        """Whether either output stream was cut at the cap."""
        return self.stdout_truncated or self.stderr_truncated


# ---- The parent side: spawning ----


@dataclasses.dataclass(slots=True)
class Child:
    """The parent's handle on one forked child. Owned by one thread at a time."""

    pid: int
    pidfd: int
    lifeline_w: int  # closing it (or dying) makes the kernel kill the child's group
    call_w: int  # -1 for a cold child (or once the call is sent)
    reply_r: int
    out_r: int
    err_r: int
    workdir: str
    fresh: bool  # the workdir was made for this child: remove it after
    started: float  # time.monotonic() of the spawn
    owner: Template  # recycles the workdir
    reply: bytearray = dataclasses.field(default_factory=bytearray)

    def fds(self) -> list[int]:
        return [self.pidfd, self.lifeline_w, self.call_w, self.reply_r, self.out_r, self.err_r]


class Template:
    """Everything a policy's children share, resolved once: filter, rules, uid."""

    def __init__(self, policy: Policy, *, spare_workdirs: int = 0) -> None:
        self.policy = policy
        self._max_spare = spare_workdirs
        # Decided once, here in the parent: a child only applies what it is handed.
        self.landlock_abi = landlock.abi_version()
        if self.landlock_abi == 0:
            warnings.warn(
                "Landlock is unavailable: sandboxed calls can read (and, outside a fresh "
                "workdir, write) whatever their uid can; see the sandbox package docstring",
                SandboxWarning,
                stacklevel=4,
            )
        # ABI 6 scopes signals, so the shell profiles may signal any pid (see seccomp.py).
        scoped = self.landlock_abi >= 6
        self.bpf = seccomp.compile_filter(policy.profile, signals_scoped=scoped)
        self.rules = base_rules(policy)
        self.uid = root_sandbox_uid(policy)
        self.env_base = policy.environment
        # Empty fresh workdirs of reaped children, for reuse: a tmpfs child leaves its
        # host-side directory untouched, and rmdir + mkdtemp cost ~0.2 ms per call.
        self._spare: list[str] = []  # guarded by _spare_lock
        self._closed = False  # guarded by _spare_lock; once set, never cleared
        self._spare_lock = threading.Lock()
        cleanup_stale_workdirs()  # what earlier parents killed with SIGKILL left behind

    def spawn(self, call: Call | None) -> Child:
        """Fork a child for ``call`` (None: a warm child that waits for its call)."""
        workdir, fresh = self._workdir()
        env = tuple(self.env_base(workdir).items())
        rules = dataclasses.replace(self.rules, write=(workdir, *self.rules.write))
        if self.policy.exec_allowed:  # the shell may run what it writes there
            rules = dataclasses.replace(rules, execute=(workdir, *rules.execute))
        plan = Plan(self.policy, workdir, fresh, env, self.bpf, self.landlock_abi, rules, self.uid)
        # O_CLOEXEC: a program some other thread of ours execs must not hold our ends.
        call_r, call_w = os.pipe2(os.O_CLOEXEC) if call is None else (-1, -1)
        (reply_r, reply_w), (out_r, out_w), (err_r, err_w), (life_r, life_w) = (
            os.pipe2(os.O_CLOEXEC) for _ in range(4)
        )
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child (never returns)
            child_main(plan, call, (call_r, reply_w, out_w, err_w, life_r))
        # Close the child's ends here, or EOF would never come while we hold them.
        for fd in (call_r, reply_w, out_w, err_w, life_r):
            if fd >= 0:
                os.close(fd)
        pidfd = os.pidfd_open(pid)  # pollable exit, and signals that cannot hit a reused pid
        started = time.monotonic()
        pipes = (call_w, reply_r, out_r, err_r)
        return Child(pid, pidfd, life_w, *pipes, workdir, fresh, started, self)

    def recycle(self, workdir: str) -> None:
        """Take back the fresh workdir of a reaped child: keep it if empty, else remove it."""
        try:
            empty = not os.listdir(workdir)  # a tmpfs child wrote nothing on the host side
        except OSError:
            return
        with self._spare_lock:
            if empty and len(self._spare) < self._max_spare and not self._closed:
                self._spare.append(workdir)
                return
        shutil.rmtree(workdir, ignore_errors=True)

    def close(self) -> None:
        """Remove the spare workdirs."""
        with self._spare_lock:
            self._closed = True  # later recycling removes instead of keeping
            spare, self._spare = self._spare, []
        for workdir in spare:
            with contextlib.suppress(OSError):
                os.rmdir(workdir)

    def _workdir(self) -> tuple[str, bool]:
        if self.policy.workdir is not None:
            return self.policy.workdir, False
        with self._spare_lock:
            if self._spare:
                return self._spare.pop(), True
        workdir = tempfile.mkdtemp(prefix=f"{_WORKDIR_PREFIX}{os.getpid()}-", dir=WORKDIR_ROOT)
        if self.uid is not None:  # the child switches uid before it mounts its tmpfs here
            os.chown(workdir, self.uid, -1)
        return workdir, True


def cleanup_stale_workdirs(root: str | None = None) -> list[str]:
    """Remove the fresh workdirs that parents which died (``kill -9``) left in ``root``
    (default :data:`WORKDIR_ROOT`, else the system temp dir); return their paths.

    A workdir's name carries its creator's pid; a pid that is alive (even if reused by
    another process) keeps its directories. Called whenever a Runner or WarmPool is made.
    """
    root = root or WORKDIR_ROOT or tempfile.gettempdir()
    removed = []
    # A pid that is alive but reused keeps its stale dirs: removal errs on the safe side.
    with contextlib.suppress(OSError), os.scandir(root) as entries:
        for entry in entries:
            pid = _workdir_owner(entry.name)
            if pid is not None and not _pid_alive(pid) and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.path)
    return removed


def _workdir_owner(name: str) -> int | None:
    if not name.startswith(_WORKDIR_PREFIX):
        return None
    pid, _, _ = name[len(_WORKDIR_PREFIX) :].partition("-")
    return int(pid) if pid.isdigit() else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


# ---- The parent side: collecting ----


@dataclasses.dataclass(slots=True)
class _Capture:
    """One output stream: the first ``cap`` bytes kept, the rest counted."""

    cap: int
    data: bytearray = dataclasses.field(default_factory=bytearray)
    dropped: int = 0

    def add(self, chunk: bytes) -> None:
        # Past the cap, keep reading (and dropping): a child blocked on a full pipe would
        # hang until the wall limit instead of finishing.
        room = self.cap - len(self.data)
        self.data += chunk[:room]
        self.dropped += max(0, len(chunk) - room)


@dataclasses.dataclass(slots=True)
class _Collected:
    stdout: _Capture
    stderr: _Capture
    reply: Reply | None = None
    layers: tuple[str, ...] = ()
    timed_out: bool = False
    reply_overflow: bool = False
    reaped: bool = False  # False: the call ended but the child is still exiting
    status: int = 0
    rusage: Any = None


def _kill_group(child: Child) -> None:
    """SIGKILL the child's process group, and the child itself (it may not have called
    setsid yet). Only before the child is reaped: then its pid cannot be reused."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)


def _collect(child: Child, deadline: float, policy: Policy, *, early: bool) -> _Collected:
    """Read the child's pipes until it has exited and they are closed, enforcing the
    deadline, then reap it. Blocks; never raises for anything the child does.

    With ``early`` (a python-profile child, which cannot have started processes), return
    as soon as the reply is complete and the output pipes are closed, without reaping:
    the child is then still exiting (tearing down its namespaces and memory).
    """
    return _Collector(child, deadline, policy.max_output_bytes).run(early=early)


class _Collector:
    """The poll loop of :func:`_collect`, one event handler per kind of event."""

    def __init__(self, child: Child, deadline: float, max_output_bytes: int) -> None:
        self.child = child
        self.out = _Collected(_Capture(max_output_bytes), _Capture(max_output_bytes))
        self.sinks = {child.out_r: self.out.stdout.add, child.err_r: self.out.stderr.add}
        self.open_fds = {child.reply_r, child.out_r, child.err_r}  # not yet at EOF
        self.poller = select.poll()
        for fd in (*self.open_fds, child.pidfd):
            self.poller.register(fd, select.POLLIN)
        self.exited = False  # the pidfd fired: the leader is a zombie, not yet reaped
        self.limit = deadline  # the wall deadline, then the end of the drain grace

    def run(self, *, early: bool) -> _Collected:
        out = self.out
        while self.open_fds or not self.exited:
            remaining = self.limit - time.monotonic()
            if remaining <= 0:
                if self.exited or out.timed_out:
                    break  # drained as long as we will: something holds a pipe open
                self._on_deadline()
                continue
            for fd, _ in self.poller.poll(remaining * 1000):
                if fd == self.child.pidfd:
                    self._on_exit()
                else:
                    self._on_data(fd)
            if early and not (self.open_fds or self.exited or out.timed_out):
                _read_frames(self.child, out)
                if out.reply is not None:
                    return out  # the call is over; the caller reaps the child later
        # Reap last: until now the leader's pid (= the group id) could not be reused.
        _, out.status, out.rusage = os.wait4(self.child.pid, 0)
        out.reaped = True
        if not out.reply_overflow:
            _read_frames(self.child, out)
        return out

    def _on_deadline(self) -> None:
        """The wall limit passed: kill the group, then give the pipes a grace to drain."""
        self.out.timed_out = True
        self.limit = time.monotonic() + KILL_GRACE_S
        _kill_group(self.child)

    def _on_exit(self) -> None:
        """The leader exited: end whatever it left running; drain for a grace at most."""
        self.exited = True
        self.limit = min(self.limit, time.monotonic() + KILL_GRACE_S)
        self.poller.unregister(self.child.pidfd)
        _kill_group(self.child)

    def _on_data(self, fd: int) -> None:
        chunk = os.read(fd, READ_CHUNK)
        if not chunk:
            self._close(fd)
        elif fd != self.child.reply_r:
            self.sinks[fd](chunk)  # output: kept up to the cap, the rest counted
        else:
            self.child.reply += chunk
            if len(self.child.reply) > MAX_REPLY_BYTES:
                # A reply that big is an attack on the parent's memory: stop reading it.
                self.out.reply_overflow = True
                self._close(fd)
                _kill_group(self.child)

    def _close(self, fd: int) -> None:
        """Stop watching ``fd`` (it is closed with the child's other fds on release)."""
        self.poller.unregister(fd)
        self.open_fds.discard(fd)


def _read_frames(child: Child, out: _Collected) -> None:
    for frame in parse_frames(bytes(child.reply)):
        if isinstance(frame, Locked):
            out.layers = tuple(frame.layers)
        else:
            out.reply = frame


def reap(child: Child) -> None:
    """Wait for a child whose call is over (it is exiting, or is killed now), and release
    it."""
    _kill_group(child)
    os.waitpid(child.pid, 0)
    _release(child)


def _release(child: Child) -> None:
    """Close the parent's descriptors of a reaped child and remove its fresh workdir."""
    for fd in child.fds():
        if fd >= 0:
            os.close(fd)
    if child.fresh:
        child.owner.recycle(child.workdir)


# ---- The parent side: classifying ----


def finish(
    child: Child,
    deadline: float,
    started: float,
    call: Call,
    policy: Policy,
    *,
    defer_reap: Callable[[Child], None] | None = None,
) -> SandboxResult:
    """Collect ``child`` and turn what it left into a result or an error. The child is
    reaped and released here, or handed to ``defer_reap`` if it is still exiting."""
    # Only a python-profile child is surely done at its reply: it cannot have forked.
    early = defer_reap is not None and policy.profile == "python"
    try:
        got = _collect(child, deadline, policy, early=early)
    except BaseException:  # KeyboardInterrupt while waiting: the child must not outlive us
        reap(child)
        raise
    if got.reaped:
        _release(child)
    else:
        assert defer_reap is not None
        defer_reap(child)
    result = _result(child, got, started)
    error = _error_for(got, result, call, policy)
    if error is not None:
        error.result = result  # type: ignore[attr-defined]  # rebuilt built-ins too
        raise error
    if got.reply is not None:
        return dataclasses.replace(result, value=got.reply.value)
    return dataclasses.replace(result, value=result.exit_code)  # a shell: its exit code


def _result(child: Child, got: _Collected, started: float) -> SandboxResult:
    """What the call left, before deciding on its value or error."""
    if got.reaped:
        status, usage = got.status, got.rusage
        exit_code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        cpu_s, peak_rss_kb = usage.ru_utime + usage.ru_stime, usage.ru_maxrss
    else:  # the child reported its own use; it exits with 0 after replying
        assert got.reply is not None
        exit_code, cpu_s, peak_rss_kb = 0, got.reply.cpu_s, got.reply.peak_rss_kb
    return SandboxResult(
        value=None,
        stdout=bytes(got.stdout.data),
        stderr=bytes(got.stderr.data),
        stdout_truncated=got.stdout.dropped > 0,
        stderr_truncated=got.stderr.dropped > 0,
        duration_s=time.monotonic() - started,
        cpu_s=cpu_s,
        peak_rss_kb=peak_rss_kb,
        exit_code=exit_code,
        layers=frozenset(got.layers),
        pid=child.pid,
    )


def _error_for(
    got: _Collected, result: SandboxResult, call: Call, policy: Policy
) -> Exception | None:
    """The error a finished call raises, or None if it produced a value."""
    # Our own kill first: it explains whatever state the child was left in.
    if got.timed_out:
        message = f"the call ran past its {policy.wall_s} s wall limit"
        return SandboxTimeout(message, "wall", policy.wall_s)
    if got.reply_overflow:
        return SandboxError(f"the call's reply exceeded {MAX_REPLY_BYTES} bytes")
    if got.reply is not None:
        return None if got.reply.failure is None else rebuild(got.reply.failure, policy)
    # No reply: the wait status is all there is.
    status = got.status
    if os.WIFSIGNALED(status):
        return _signal_error(os.WTERMSIG(status), result, policy)
    code = os.WEXITSTATUS(status)
    if call.kind == "shell" and code != EXIT_NO_REPLY:
        return None  # the shell ran (and exec closed the reply pipe): its status is its value
    if code == EXIT_NO_MEMORY:
        return SandboxMemoryError("the call ran out of memory", policy.memory_mb)
    return SandboxCrashed(f"the child exited with status {code} without a reply", exit_code=code)


def _signal_error(sig: int, result: SandboxResult, policy: Policy) -> SandboxError:
    # SIGKILL comes at the hard limit (soft + 1 s) when the call ignored SIGXCPU. rusage
    # samples CPU time differently from the rlimit clock: allow it to read a bit short.
    cpu_limit = max(1.0, float(-(-policy.cpu_s // 1)))
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and result.cpu_s >= 0.9 * cpu_limit):
        return SandboxTimeout(f"the call used its {policy.cpu_s} s of CPU", "cpu", policy.cpu_s)
    if sig == signal.SIGSYS:
        return SandboxViolation(
            "the seccomp filter killed the call: a syscall from a foreign ABI (i386 int 0x80 "
            "or x32)"
        )
    name = signal.Signals(sig).name if sig in signal.Signals.__members__.values() else str(sig)
    return SandboxCrashed(f"the child was killed by {name}", signal=sig)


def rebuild(failure: Failure, policy: Policy) -> Exception:
    """The parent-side exception for a child's failure, with its traceback as cause."""
    exc: Exception
    if failure.kind == "violation":
        exc = SandboxViolation(
            f"the profile denies syscall {failure.syscall!r} ({failure.message})",
            failure.syscall,
            failure.nr,
        )
    elif failure.kind == "memory":
        exc = SandboxMemoryError(
            f"the call ran out of its {policy.memory_mb} MiB of memory", policy.memory_mb
        )
    elif failure.kind == "exit":
        code = failure.exit_code
        exc = SandboxCrashed(f"the call exited with status {code}", exit_code=code)
    elif failure.kind == "setup":
        exc = SandboxError(f"could not set up the sandbox: {failure.type_name}: {failure.message}")
    elif failure.kind == "unserializable":
        exc = SandboxError(f"the call's result is not plain data: {failure.message}")
    else:
        exc = _rebuild_raised(failure)
    if failure.traceback:
        exc.__cause__ = RemoteTraceback(failure.traceback)
    return exc


def _rebuild_raised(failure: Failure) -> Exception:
    """A built-in exception type is rebuilt as itself; any other becomes SandboxCallError
    (the parent must not import or construct classes named by the child)."""
    module, _, name = failure.type_name.rpartition(".")
    # Looked up in builtins only, never imported: the name comes from untrusted bytes.
    cls = getattr(builtins, name, None) if module == "builtins" else None
    if isinstance(cls, type) and issubclass(cls, Exception):
        with contextlib.suppress(Exception):  # args that do not fit: fall through
            exc = cls(*failure.args)
            if isinstance(exc, OSError):
                exc.filename, exc.filename2 = failure.filename, failure.filename2
            return exc
    return SandboxCallError(f"{failure.type_name}: {failure.message}", failure.type_name)


# ---- Public entry points ----


class Runner:
    """Runs each call in a freshly forked sandboxed child (a *cold* call: fork, lock down,
    run, reap; about 5-10 ms on top of the call).

    Made once per policy: it compiles the profile's seccomp filter (cached per process) and
    resolves the Landlock rules. Safe to use from several threads; each call blocks its
    caller.

    Raises:
        SandboxWarning: (a warning, not an error) the kernel lacks Landlock.
    """

    def __init__(self, policy: Policy | None = None) -> None:
        self.policy = policy if policy is not None else Policy()
        self._template = Template(self.policy)

    def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> SandboxResult:
        """Run ``fn(*args, **kwargs)`` in a sandboxed child and return its result.

        Blocks until the call ends, at most ``policy.wall_s`` plus a kill grace.

        Raises:
            SandboxTimeout, SandboxMemoryError, SandboxViolation, SandboxCrashed: the call
                broke a limit or a rule, or died.
            SandboxCallError: ``fn`` raised an exception of a non-built-in type.
            SandboxError: the sandbox could not run the call, or its value is not plain data.
            Exception: ``fn`` raised a built-in exception type; it is re-raised as such,
                with the child's traceback as ``__cause__``.
        """
        return self._run(Call("call", fn, args, kwargs))

    def run_python(self, source: str) -> SandboxResult:
        """Run Python ``source`` (the built-in ``python`` tool); the value is that of the
        last statement if it is an expression. Blocks and raises as :meth:`call`."""
        return self._run(Call("python", text=source))

    def run_shell(self, command: str) -> SandboxResult:
        """Run ``sh -c command`` (the built-in ``shell`` tool); the value is its exit code.
        Blocks and raises as :meth:`call`.

        Raises:
            ValueError: the policy's profile is ``python``, which cannot run programs.
        """
        check_shell(self.policy)
        return self._run(Call("shell", text=command))

    def _run(self, call: Call) -> SandboxResult:
        child = self._template.spawn(call)
        # A cold call's wall time includes its lockdown: the caller waits for both.
        deadline = child.started + self.policy.wall_s
        return finish(child, deadline, child.started, call, self.policy)


def check_shell(policy: Policy) -> None:
    if not policy.exec_allowed:
        raise ValueError("the python profile cannot run programs; use profile='shell'")
