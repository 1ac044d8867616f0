"""What a sandboxed call may do: its profile, its limits, its files and its environment.

A :class:`Policy` is a frozen value, checked when it is made: a bad limit is a ``ValueError``
at the caller, never a surprise in the child. It says nothing about *how* the limits are
enforced (that is ``runner.py``'s lockdown sequence); it is what the kernel stores per tool
and what ``astra.tool(profile=..., **limits)`` builds.

Invariants:

- ``profile`` is one of :data:`PROFILES`; each later profile allows a superset of the
  earlier one (``python`` < ``shell`` < ``network``).
- Every path is absolute; ``read_paths`` and ``write_paths`` are tuples (hashable, ordered).
- The environment of the child is :meth:`Policy.environment`: a fixed base plus ``env``,
  never anything inherited from the parent.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_CPU_S",
    "DEFAULT_MAX_FILE_BYTES",
    "DEFAULT_MAX_OUTPUT_BYTES",
    "DEFAULT_MAX_PROCS",
    "DEFAULT_MEMORY_MB",
    "DEFAULT_WALL_S",
    "PROFILES",
    "Policy",
    "Profile",
]

import dataclasses
import os
import types
from typing import TYPE_CHECKING, Final, Literal, get_args

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

#: The profiles, from most to least restrictive. ``python``: compute only (no exec, no new
#: processes, no network); ``shell``: exec and fork allowed, no network; ``network``: as
#: shell, plus IPv4/IPv6 sockets.
Profile = Literal["python", "shell", "network"]
PROFILES: Final[tuple[Profile, ...]] = get_args(Profile)

#: CPU seconds a call may use (RLIMIT_CPU, rounded up to whole seconds by the kernel).
DEFAULT_CPU_S: Final = float(os.getenv("ASTRA_SANDBOX_CPU_S", 10.0))
#: Memory a call may add to what its forked child inherited, in MiB (RLIMIT_AS).
DEFAULT_MEMORY_MB: Final = int(os.getenv("ASTRA_SANDBOX_MEMORY_MB", 512))
#: Wall-clock seconds before the call's whole process group is killed.
DEFAULT_WALL_S: Final = float(os.getenv("ASTRA_SANDBOX_WALL_S", 30.0))
#: Bytes of stdout, and separately of stderr, kept; the rest is read, dropped and flagged.
DEFAULT_MAX_OUTPUT_BYTES: Final = int(os.getenv("ASTRA_SANDBOX_MAX_OUTPUT_BYTES", 1 << 20))
#: Bytes a call may write to files: per file (RLIMIT_FSIZE), and in total in a fresh workdir
#: (a tmpfs of this size where mount namespaces are permitted).
DEFAULT_MAX_FILE_BYTES: Final = int(os.getenv("ASTRA_SANDBOX_MAX_FILE_BYTES", 64 << 20))
#: Processes and threads a call may run at once (RLIMIT_NPROC; binds only a non-root uid).
DEFAULT_MAX_PROCS: Final = int(os.getenv("ASTRA_SANDBOX_MAX_PROCS", 32))

#: PATH of the child: system directories only, never the parent's PATH.
_CHILD_PATH: Final = "/usr/local/bin:/usr/bin:/bin"


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    """The profile and limits of a sandboxed call. Immutable; build variants with
    :meth:`replace`.

    Args:
        profile: ``"python"``, ``"shell"`` or ``"network"`` (see :data:`PROFILES`).
        cpu_s: CPU seconds (user + system) before the kernel stops the call.
        memory_mb: MiB of address space the call may add to what its child inherited.
        wall_s: wall-clock seconds before the call's whole process group is killed.
        max_output_bytes: bytes of stdout, and of stderr, kept (the rest is flagged).
        max_file_bytes: bytes per file written; in a fresh workdir also the total.
        max_procs: processes and threads at once (RLIMIT_NPROC).
        workdir: the call's working directory. None (the default): a fresh directory made
            for the call and removed after it. A given directory is used as is and kept.
        read_paths: extra files or directories the call may read (beside the interpreter
            and system libraries its profile needs).
        write_paths: extra files or directories the call may read and write.
        env: variables added to the child's fixed base environment (``PATH``, ``LANG``,
            ``HOME`` and ``TMPDIR``); nothing of the parent's environment is passed on.

    Raises:
        ValueError: an unknown profile, a limit that is not positive, or a relative path.
    """

    profile: Profile = "python"
    cpu_s: float = DEFAULT_CPU_S
    memory_mb: int = DEFAULT_MEMORY_MB
    wall_s: float = DEFAULT_WALL_S
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    max_procs: int = DEFAULT_MAX_PROCS
    workdir: str | None = None
    read_paths: tuple[str, ...] = ()
    write_paths: tuple[str, ...] = ()
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"unknown profile {self.profile!r}; expected one of {PROFILES}")
        for name in ("cpu_s", "memory_mb", "wall_s", "max_file_bytes", "max_procs"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Policy.{name} must be positive, got {getattr(self, name)!r}")
        if self.max_output_bytes < 0:
            raise ValueError(f"Policy.max_output_bytes must be >= 0: {self.max_output_bytes}")
        # Normalize containers so equal policies compare (and hash) equal whatever was passed.
        object.__setattr__(self, "read_paths", _absolute_paths("read_paths", self.read_paths))
        object.__setattr__(self, "write_paths", _absolute_paths("write_paths", self.write_paths))
        if self.workdir is not None:
            _absolute_paths("workdir", (self.workdir,))
        env = dict(self.env)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise ValueError("Policy.env maps str to str")
        object.__setattr__(self, "env", types.MappingProxyType(env))

    def __hash__(self) -> int:
        # The generated hash would hash the env mapping, which is not hashable.
        fields = tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "env")
        return hash((fields, tuple(sorted(self.env.items()))))

    @property
    def network(self) -> bool:
        """Whether the call may open IPv4/IPv6 sockets."""
        return self.profile == "network"

    @property
    def exec_allowed(self) -> bool:
        """Whether the call may run programs and fork (the shell and network profiles)."""
        return self.profile != "python"

    def replace(self, **changes: object) -> Policy:
        """A copy with ``changes`` applied (and checked again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def environment(self, workdir: str) -> dict[str, str]:
        """The child's whole environment: the fixed base for ``workdir``, then ``env``."""
        base = {
            "PATH": _CHILD_PATH,
            "LANG": "C.UTF-8",
            "HOME": workdir,
            "TMPDIR": workdir,
            "PYTHONDONTWRITEBYTECODE": "1",  # a shell's python3 must not try to cache
        }
        return base | dict(self.env)


def _absolute_paths(name: str, paths: Iterable[str]) -> tuple[str, ...]:
    if isinstance(paths, str):  # a lone string would be taken as a sequence of characters
        paths = (paths,)
    out = tuple(os.fspath(p) for p in paths)
    for p in out:
        if not os.path.isabs(p):
            raise ValueError(f"Policy.{name} must hold absolute paths, got {p!r}")
    return out
