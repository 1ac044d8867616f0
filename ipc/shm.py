"""Named POSIX shared-memory segments and semaphores, grouped per kernel instance.

Every object Astra puts in shared memory belongs to one *instance* (one embedded kernel or one
``astrad``) and is named ``/astra-<instance>-<object>``, where ``<instance>`` is the creating
process's pid, then ``.<n>`` for the n-th further instance of that process, then ``@<label>``
when a label is set (``ASTRA_SHM_LABEL``; the test suite uses one per xdist worker):

    /dev/shm/astra-4711-owner            the owner record (created first, removed last)
    /dev/shm/astra-4711-sup_to_w03       a ring segment
    /dev/shm/sem.astra-4711-sup_to_w03.i0  one of its semaphores (glibc keeps them here too)

The owner record holds the owner's pid and its start time (clock ticks since boot, from
``/proc/<pid>/stat``), so a pid reused by an unrelated process does not keep a dead instance's
objects alive. ``cleanup_stale()`` removes every object of every instance whose owner is gone;
the kernel calls it at start and ``astra`` exposes it on the command line.

Segments and semaphores are created with mode 0600 (or the mode given, e.g. 0660 with a
configured group). Opening one without access raises the builtin ``PermissionError``.

``OFDLock`` is the one cross-process lock of the layer: an open-file-description lock on a
byte of a segment's file. The kernel drops it when its holder dies, unlike a semaphore used as
a lock, which stays taken forever after a SIGKILL (NOTES.md). It costs about 1.5 us a round,
so it guards only slow paths: claiming ring lanes and arena allocation.
"""

from __future__ import annotations

__all__ = [
    "SHM_DIR",
    "Instance",
    "OFDLock",
    "Segment",
    "cleanup_stale",
    "instance_objects",
    "is_alive",
    "process_start_time",
]

import contextlib
import fcntl
import itertools
import mmap
import os
import re
import struct
import threading
import weakref
from typing import TYPE_CHECKING, Final

import posix_ipc

from .errors import SegmentError

if TYPE_CHECKING:
    from collections.abc import Iterator
    from types import TracebackType

#: Where Linux shows POSIX shared memory and named semaphores (as ``sem.<name>``).
SHM_DIR: Final = os.getenv("ASTRA_SHM_DIR", "/dev/shm")

#: Optional label appended to instance ids (``@<label>``): separates test workers, users, etc.
_LABEL_ENV: Final = "ASTRA_SHM_LABEL"

#: Default permission bits of every segment and semaphore (Principle 7: private by default).
DEFAULT_MODE: Final = 0o600

_NAME_RE: Final = re.compile(
    r"^(?:sem\.)?astra-(?P<inst>(?P<pid>\d+)(?:\.\d+)?(?:@[A-Za-z0-9_]+)?)-(?P<obj>.+)$"
)

# Owner record: magic, version, pid, start time (ticks since boot). Written once by the owner
# before any other object of the instance exists; never modified; unlinked last.
_OWNER_FMT: Final = "<8sQQQ"
_OWNER_SIZE: Final = 32
assert struct.calcsize(_OWNER_FMT) == _OWNER_SIZE
_OWNER_MAGIC: Final = b"ASTRAOWN"
_OWNER_VERSION: Final = 1

_instance_seq = itertools.count()


# ---- Process identity ----


def process_start_time(pid: int) -> int | None:
    """Start time of live process ``pid`` in clock ticks since boot, or None if it is gone.

    A zombie (exited, not yet reaped) counts as gone: it will never write again.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses; fields resume after the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])  # field 22, starttime


def is_alive(pid: int, start_time: int) -> bool:
    """Whether the process ``pid`` that started at ``start_time`` is still running."""
    return pid > 0 and process_start_time(pid) == start_time


# ---- Segments ----


class Segment:
    """One mapped POSIX shared-memory segment.

    ``buf`` is a writable memoryview over the whole mapping. ``close()`` unmaps it (if numpy
    views still export the mapping, the unmap is left to the garbage collector instead of
    raising ``BufferError``); ``unlink()`` removes the name.
    """

    def __init__(self, name: str, size: int, mapping: mmap.mmap) -> None:
        self.name = name
        self.size = size
        self._mmap: mmap.mmap | None = mapping
        self.buf: memoryview = memoryview(mapping)

    @classmethod
    def create(cls, name: str, size: int, mode: int = DEFAULT_MODE) -> Segment:
        """Create and map a new segment of ``size`` bytes (zero-filled). Raises
        ``FileExistsError`` if the name is taken."""
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=mode, size=size)
        except posix_ipc.ExistentialError as exc:
            raise FileExistsError(f"shared memory {name} already exists") from exc
        return cls._map(shm, name, size)

    @classmethod
    def open(cls, name: str) -> Segment:
        """Map an existing segment. Raises ``SegmentError`` if it does not exist and
        ``PermissionError`` if this process may not open it."""
        try:
            shm = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError as exc:
            raise SegmentError(f"no shared memory segment {name}") from exc
        except posix_ipc.PermissionsError as exc:
            raise PermissionError(f"no access to shared memory {name}") from exc
        return cls._map(shm, name, shm.size)

    @classmethod
    def _map(cls, shm: posix_ipc.SharedMemory, name: str, size: int) -> Segment:
        try:
            mapping = mmap.mmap(shm.fd, size)
        finally:
            shm.close_fd()  # the mapping keeps the memory; the fd is not needed
        return cls(name, size, mapping)

    @property
    def path(self) -> str:
        """The segment's file under ``SHM_DIR`` (for locks and diagnostics)."""
        return os.path.join(SHM_DIR, self.name.lstrip("/"))

    def close(self) -> None:
        """Unmap. Safe to call twice."""
        if self._mmap is None:
            return
        with contextlib.suppress(BufferError):  # live numpy views: the GC unmaps later
            self.buf.release()
            self._mmap.close()
        self._mmap = None

    def unlink(self) -> None:
        """Remove the name (the memory lives until every mapping is gone). Safe to call twice."""
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory(self.name)


# ---- Instances ----


class Instance:
    """The namespace of one kernel instance's shared objects.

    The creating process owns it (``Instance.create``); other processes ``Instance.attach`` by
    id. ``close()`` (owner only) removes every object whose name carries the instance id,
    whoever created it, then the owner record. A fork child inherits the handle but not the
    ownership: its ``close()`` removes nothing.
    """

    def __init__(self, instance_id: str, owner: bool, mode: int = DEFAULT_MODE) -> None:
        self.id = instance_id
        self.owner = owner
        self.mode = mode
        self._closed = False
        self._owner_pid = os.getpid() if owner else -1

    @classmethod
    def create(cls, label: str | None = None, mode: int = DEFAULT_MODE) -> Instance:
        """Create a new instance owned by this process and write its owner record."""
        label = os.getenv(_LABEL_ENV, "") if label is None else label
        if label and not re.fullmatch(r"[A-Za-z0-9_]+", label):
            raise ValueError(f"instance label must be [A-Za-z0-9_]+, got {label!r}")
        pid = os.getpid()
        while True:
            seq = next(_instance_seq)
            inst = f"{pid}" + (f".{seq}" if seq else "") + (f"@{label}" if label else "")
            try:
                record = Segment.create(f"/astra-{inst}-owner", _OWNER_SIZE, mode)
            except FileExistsError:
                continue  # left by a dead process with our pid, or a fork sibling's counter
            break
        start = process_start_time(pid)
        assert start is not None
        struct.pack_into(_OWNER_FMT, record.buf, 0, _OWNER_MAGIC, _OWNER_VERSION, pid, start)
        record.close()
        return cls(inst, owner=True, mode=mode)

    @classmethod
    def attach(cls, instance_id: str) -> Instance:
        """Join an existing instance from another process. Raises ``SegmentError`` if it
        has no owner record."""
        if read_owner(instance_id) is None:
            raise SegmentError(f"no Astra instance {instance_id!r}")
        return cls(instance_id, owner=False)

    def name(self, obj: str) -> str:
        """The full POSIX name of object ``obj`` of this instance."""
        assert "/" not in obj, obj
        return f"/astra-{self.id}-{obj}"

    def create_segment(self, obj: str, size: int) -> Segment:
        """Create segment ``obj`` of this instance."""
        return Segment.create(self.name(obj), size, self.mode)

    def open_segment(self, obj: str) -> Segment:
        """Map existing segment ``obj`` of this instance."""
        return Segment.open(self.name(obj))

    def create_semaphore(self, obj: str, value: int) -> posix_ipc.Semaphore:
        """Create semaphore ``obj`` of this instance with initial ``value``."""
        return posix_ipc.Semaphore(
            self.name(obj), posix_ipc.O_CREX, mode=self.mode, initial_value=value
        )

    def open_semaphore(self, obj: str) -> posix_ipc.Semaphore:
        """Open existing semaphore ``obj``. Raises ``SegmentError`` or ``PermissionError``."""
        try:
            return posix_ipc.Semaphore(self.name(obj))
        except posix_ipc.ExistentialError as exc:
            raise SegmentError(f"no semaphore {self.name(obj)}") from exc
        except posix_ipc.PermissionsError as exc:
            raise PermissionError(f"no access to semaphore {self.name(obj)}") from exc

    def close(self) -> None:
        """Owner only: remove every object of this instance, the owner record last. In any
        other process (one that attached, or a fork child of the owner) this does nothing."""
        if self._closed or self._owner_pid != os.getpid():
            return
        self._closed = True
        _remove_instance(self.id)

    def __enter__(self) -> Instance:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Instance {self.id} owner={self.owner}>"


def read_owner(instance_id: str) -> tuple[int, int] | None:
    """The (pid, start time) of an instance's owner record, or None if missing or malformed."""
    try:
        fd = os.open(os.path.join(SHM_DIR, f"astra-{instance_id}-owner"), os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        raw = f.read(_OWNER_SIZE)
    if len(raw) != _OWNER_SIZE:
        return None
    magic, version, pid, start = struct.unpack(_OWNER_FMT, raw)
    if magic != _OWNER_MAGIC or version != _OWNER_VERSION:
        return None
    return pid, start


def instance_objects(instance_id: str | None = None) -> dict[str, list[str]]:
    """Entries of ``SHM_DIR`` that belong to Astra, grouped by instance id."""
    groups: dict[str, list[str]] = {}
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return groups
    for entry in entries:
        m = _NAME_RE.match(entry)
        if m and (instance_id is None or m["inst"] == instance_id):
            groups.setdefault(m["inst"], []).append(entry)
    return groups


def _remove_instance(instance_id: str, entries: list[str] | None = None) -> list[str]:
    if entries is None:
        entries = instance_objects(instance_id).get(instance_id, [])
    owner = f"astra-{instance_id}-owner"
    removed = []
    # The owner record goes last, so a crash mid-removal still leaves a record to act on.
    for entry in sorted(entries, key=lambda e: e == owner):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(SHM_DIR, entry))
            removed.append(entry)
    return removed


def _owner_alive(instance_id: str, pid_in_name: int) -> bool:
    record = read_owner(instance_id)
    if record is not None:
        return is_alive(*record)
    # No record: the owner is creating or removing the instance right now, or died doing so.
    # XX: a pid reused by a live unrelated process keeps such remains until it exits.
    return process_start_time(pid_in_name) is not None


def cleanup_stale(label: str | None = None) -> list[str]:
    """Remove every object of every instance whose owner process is gone.

    Called by the kernel at start and by ``astra cleanup``. With ``label``, only instances
    carrying that label are considered. Returns the removed entry names.
    """
    removed: list[str] = []
    for inst, entries in instance_objects().items():
        if label is not None and not inst.endswith(f"@{label}"):
            continue
        m = _NAME_RE.match(entries[0])
        assert m is not None
        if not _owner_alive(inst, int(m["pid"])):
            removed += _remove_instance(inst, entries)
    return removed


# ---- Cross-process lock ----

# struct flock on Linux x86-64 and aarch64: short l_type, short l_whence, (pad), off_t l_start,
# off_t l_len, pid_t l_pid, (pad).
_FLOCK_FMT: Final = "@hhqqi4x"
assert struct.calcsize(_FLOCK_FMT) == 32


class OFDLock:
    """An open-file-description lock on one byte of a file: a cross-process mutex that the
    kernel releases when its holder dies.

    Safe across threads (a thread lock is taken first) and across fork (a child reopens its
    own file description, since a shared description would share the lock).
    """

    def __init__(self, path: str, byte: int = 0) -> None:
        self._path = path
        self._byte = byte
        self._thread_lock = threading.Lock()
        self._fd = -1
        self._pid = -1
        _all_locks.add(self)

    def _fd_for_this_process(self) -> int:
        if self._pid != os.getpid():
            self._fd = os.open(self._path, os.O_RDWR | os.O_CLOEXEC)
            self._pid = os.getpid()
        return self._fd

    def _after_fork_in_child(self) -> None:
        # The inherited fd shares the parent's description, hence its lock: if we kept it, a
        # parent killed while holding the lock would leave it held for as long as we live.
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd, self._pid = -1, -1
        self._thread_lock = threading.Lock()

    def _fcntl(self, cmd: int, ltype: int) -> None:
        arg = struct.pack(_FLOCK_FMT, ltype, os.SEEK_SET, self._byte, 1, 0)
        fcntl.fcntl(self._fd_for_this_process(), cmd, arg)

    def acquire(self) -> None:
        """Block until this process holds the lock."""
        self._thread_lock.acquire()
        try:
            self._fcntl(fcntl.F_OFD_SETLKW, fcntl.F_WRLCK)
        except BaseException:
            self._thread_lock.release()
            raise

    def try_acquire(self) -> bool:
        """Take the lock if it is free now; True if taken."""
        if not self._thread_lock.acquire(blocking=False):
            return False
        try:
            self._fcntl(fcntl.F_OFD_SETLK, fcntl.F_WRLCK)
        except (BlockingIOError, PermissionError):  # EAGAIN/EACCES: another holder
            self._thread_lock.release()
            return False
        except BaseException:
            self._thread_lock.release()
            raise
        return True

    def release(self) -> None:
        """Release the lock (held by this thread)."""
        try:
            self._fcntl(fcntl.F_OFD_SETLK, fcntl.F_UNLCK)
        finally:
            self._thread_lock.release()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """``with lock.held():`` runs the block holding the lock."""
        self.acquire()
        try:
            yield
        finally:
            self.release()

    def close(self) -> None:
        """Close this process's description (dropping the lock if held)."""
        if self._fd >= 0 and self._pid == os.getpid():
            os.close(self._fd)
        self._fd, self._pid = -1, -1


_all_locks: weakref.WeakSet[OFDLock] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for lock in list(_all_locks):
        lock._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
