"""The kernel's durable store: named tables of bytes in one LMDB environment.

A ``Journal`` is a directory (0700) holding LMDB's ``data.mdb`` and ``lock.mdb`` (0600). The
kernel keeps agent checkpoints (table ``agents``, see ``kernel/actors.py``) and DAG journals
in it; each concern gets a named table (an LMDB sub-database). Keys and values are bytes:
callers encode with msgspec or pickle, the journal never interprets them.

    Table.get/scan --read txn--.                      .-- data.mdb  (B+tree pages, mmap)
    Table.put/delete ----------+--> Journal (lock) ---+
    Journal.batch() --one write txn-'                 '-- lock.mdb  (reader table, writer mutex)

Protocols:

1. *Writes.* Every write is one LMDB write transaction: ``Table.put``/``delete`` a
   transaction of one operation, ``with journal.batch() as b: ...`` one transaction for all
   the operations recorded in the block, committed when the block exits and dropped whole
   if it raises. The batch records operations in memory and applies them at exit, so the
   block holds no lock while user code runs and a transaction can be replayed as a unit.
2. *Single writer at a time.* LMDB serializes write transactions with one mutex in
   ``lock.mdb``, across threads and processes alike; readers never block and never block
   the writer (MVCC: a read transaction sees the snapshot it began on). The mutex is
   robust: a writer that dies holding it (SIGKILL mid-commit) leaves it in the
   owner-dead state and the next writer recovers it, discarding the dead transaction.
3. *Map growth.* LMDB maps the file at a fixed size (``map_size``). A write that does not
   fit fails with ``MDB_MAP_FULL``; the journal aborts it, doubles the map (up to
   ``max_map_size``) and replays the transaction, so callers never see it. Past the cap the
   write raises ``JournalFullError`` and changes nothing. When another process grew the
   map, the next transaction here gets ``MDB_MAP_RESIZED``; the journal adopts the new size
   and retries. Growing requires that no transaction of this process is live, which the
   journal's lock guarantees: every transaction begins and ends inside one method call
   (``scan`` copies its range out before returning, rather than holding a cursor open).
4. *Fork.* LMDB forbids using an environment in a child of the process that opened it. An
   ``os.register_at_fork`` hook takes every open journal's lock before ``fork()`` (so no
   transaction is live at that moment) and, in the child, drops the inherited handles
   without closing them: py-lmdb's ``close()`` waits for operations in flight, and one that
   another thread of the parent was running outside the journal's lock (py-lmdb's own
   bookkeeping, another module's environment) never ends in the child, which hung there.
   A call on such a journal raises ``JournalError``; ``reopen()`` opens it afresh in the
   child, and ``Journal.open`` of the same path works there too.

Durability:

- ``sync=True`` (the default): a commit returns after ``fsync``; every committed transaction
  survives SIGKILL, a kernel panic and power loss.
- ``sync=False`` (``MDB_NOSYNC``): commits reach the page cache only. A SIGKILLed process
  loses nothing it committed (the kernel's page cache outlives the process); a crash of the
  machine may lose the last transactions, though not the file's integrity on a filesystem
  that keeps write order (ext4, xfs). ``Journal.sync()`` flushes on demand.
- Never durable: a transaction that had not committed when its process died. It is
  discarded whole, never half applied.

Open questions:

- XX: readers left by processes killed mid-read keep old pages alive until the next
  ``reader_check``; the journal runs one at open. A long-lived astrad may want one per tick.
"""

from __future__ import annotations

__all__ = [
    "MAP_BYTES",
    "MAX_MAP_BYTES",
    "MAX_READERS",
    "Batch",
    "Journal",
    "JournalError",
    "JournalFullError",
    "JournalStatistics",
    "Table",
]

import contextlib
import dataclasses
import os
import threading
import weakref
from typing import TYPE_CHECKING, Final, TypeVar

import lmdb

from .errors import KernelError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from types import TracebackType

    _Txn = lmdb.Transaction[bytes]

#: The map size a journal starts with; it doubles when full, up to ``MAX_MAP_BYTES``.
MAP_BYTES: Final = int(os.getenv("ASTRA_JOURNAL_MAP_BYTES", str(64 << 20)))
#: The largest map a journal grows to; writes past it raise ``JournalFullError``.
MAX_MAP_BYTES: Final = int(os.getenv("ASTRA_JOURNAL_MAX_MAP_BYTES", str(64 << 30)))
#: Reader slots in ``lock.mdb``: one per concurrent read transaction, all processes together
#: (each journal object uses at most one at a time, so this bounds processes x threads).
MAX_READERS: Final = int(os.getenv("ASTRA_JOURNAL_MAX_READERS", "1024"))
#: Longest table name, in UTF-8 bytes.
MAX_TABLE_NAME_BYTES: Final = 200
#: Mode of the journal directory when the journal creates it, and of LMDB's files.
DIR_MODE: Final = 0o700
FILE_MODE: Final = 0o600

_T = TypeVar("_T")
# One recorded batch operation: (table name, key, value); value None means delete.
_Op = tuple[str, bytes, bytes | None]


class JournalError(KernelError):
    """Root of the journal's errors (a ``KernelError``). Raised for any LMDB failure other
    than a full map (the message names the LMDB error; ``__cause__`` holds it), for a bad
    key or table name, for a closed journal, and for a journal used in a forked child (call
    ``reopen()``)."""


class JournalFullError(JournalError):
    """Raised by a write that does not fit even after the map grew to ``max_map_size``.
    Nothing of the failed transaction was applied; reads and smaller writes still work."""


@dataclasses.dataclass(frozen=True, slots=True)
class JournalStatistics:
    """A snapshot of ``Journal.statistics()``."""

    path: str  #: the journal directory
    map_size: int  #: bytes currently mapped (grows by doubling)
    max_map_size: int  #: the cap on growth
    used_bytes: int  #: bytes of pages in use, up to the last page written
    readers: int  #: reader slots taken so far (free ones included), all processes together
    max_readers: int  #: reader slots available


# Journals open in this process, for the fork hook. Weak: a dropped journal leaves the set.
_open_journals: weakref.WeakSet[Journal] = weakref.WeakSet()


class Journal:
    """One LMDB environment, shared by threads of one process (calls are serialized by a
    lock) and by processes (each opens its own ``Journal`` on the same path).

    Build with ``Journal.open``; use as a context manager or call ``close()``.
    """

    def __init__(
        self,
        path: str,
        *,
        map_size: int,
        max_map_size: int,
        sync: bool,
        max_dbs: int,
        max_readers: int,
    ) -> None:
        """Private: use ``Journal.open``."""
        self._path = path
        self._map_size = map_size
        self._max_map_size = max(max_map_size, map_size)
        self._sync = sync
        self._max_dbs = max_dbs
        self._max_readers = max_readers
        self._lock = threading.Lock()  # held around every LMDB call of this object
        self._env: lmdb.Environment | None = None
        self._pid = os.getpid()  # the process that opened _env; only it may use it
        self._dbs: dict[str, lmdb._Database] = {}  # table name -> handle of _env
        self._tables: dict[str, Table] = {}
        self._max_key = 0

    # ---- Opening and closing ----

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        map_size: int = MAP_BYTES,
        max_map_size: int = MAX_MAP_BYTES,
        sync: bool = True,
        max_dbs: int = 64,
        max_readers: int = MAX_READERS,
    ) -> Journal:
        """Open (creating if needed) the journal in directory ``path``.

        Called by whoever owns durable state (astrad's supervisor, tests). Blocks only on
        file system calls; opening an environment that a SIGKILLed writer left mid-transaction
        works (LMDB discards the dead transaction). Stale reader slots of dead processes are
        cleared.

        Args:
            path: the directory; created 0700 if missing (an existing one keeps its mode).
            map_size: initial map size in bytes; it doubles on demand.
            max_map_size: the cap on growth (``JournalFullError`` past it).
            sync: fsync on every commit (see the module doc on durability).
            max_dbs: the most tables this journal may hold.
            max_readers: reader slots, fixed by whoever creates the lock file.

        Raises:
            JournalError: LMDB refused (no permission, corrupt file, already open here).
        """
        path = os.fspath(path)
        try:
            os.makedirs(path, mode=DIR_MODE, exist_ok=True)
        except OSError as exc:
            raise JournalError(f"cannot create journal directory {path}: {exc}") from exc
        journal = cls(
            path,
            map_size=map_size,
            max_map_size=max_map_size,
            sync=sync,
            max_dbs=max_dbs,
            max_readers=max_readers,
        )
        journal._open_env()
        return journal

    def _open_env(self) -> None:
        release_inherited(self._path)
        try:
            env = lmdb.open(
                self._path,
                map_size=self._map_size,
                subdir=True,
                sync=self._sync,
                mode=FILE_MODE,
                max_dbs=self._max_dbs,
                max_readers=self._max_readers,
                # A spare read txn keeps a reader slot across calls; a forked child that
                # freed it would free the parent's slot (py-lmdb #346). Begin a fresh one.
                max_spare_txns=0,
                lock=True,
            )
        except lmdb.Error as exc:
            raise JournalError(f"cannot open journal {self._path}: {exc}") from exc
        try:
            env.reader_check()  # free slots of readers that died
            self._max_key = env.max_key_size()
            self._map_size = env.info()["map_size"]  # an existing map may be larger
        except lmdb.Error as exc:
            env.close()
            raise JournalError(f"cannot open journal {self._path}: {exc}") from exc
        self._env = env
        self._pid = os.getpid()
        self._dbs.clear()
        _open_journals.add(self)

    def close(self) -> None:
        """Close the environment; idempotent. Tables and batches of this journal raise
        ``JournalError`` afterwards. In a forked child it only drops the inherited handles."""
        with self._lock:
            self._close_env()
        _open_journals.discard(self)

    def _close_env(self) -> None:
        env, self._env = self._env, None
        self._dbs.clear()
        if env is not None:
            # Safe in a forked child as well: no transaction is live (protocol 4), and
            # mdb_env_close clears reader slots of the calling pid only.
            env.close()

    def reopen(self) -> None:
        """Open the environment again in this process: the way for a forked child to use a
        journal its parent opened (protocol 4). ``Table`` handles stay valid.

        Raises:
            JournalError: as ``Journal.open``.
        """
        if self._pid != os.getpid():
            self._lock = threading.Lock()  # the parent's may have been held by a thread
        with self._lock:
            self._close_env()
            self._open_env()

    def __enter__(self) -> Journal:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "open" if self._env is not None else "closed"
        return f"<Journal {self._path!r} {state}>"

    @property
    def path(self) -> str:
        """The journal directory."""
        return self._path

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called (or the journal was inherited through fork)."""
        return self._env is None

    # ---- Tables and batches ----

    def table(self, name: str) -> Table:
        """The table ``name``, created on first use; handles are cached per name.

        Raises:
            JournalError: a bad name, more than ``max_dbs`` tables, a closed journal.
        """
        table = self._tables.get(name)
        if table is None:
            encoded = name.encode() if isinstance(name, str) else b""
            if not 0 < len(encoded) <= MAX_TABLE_NAME_BYTES or b"\0" in encoded:
                raise JournalError(f"bad table name {name!r}: 1-200 bytes of UTF-8, no NUL")
            self._call(lambda env: self._db(env, name))
            table = self._tables.setdefault(name, Table(self, name))
        return table

    def tables(self) -> list[str]:
        """Names of the tables in the journal (all processes' tables), sorted."""

        def read(txn: _Txn) -> list[str]:
            return sorted(key.decode() for key, _ in txn.cursor())

        return self._run(read, write=False)

    def batch(self) -> Batch:
        """A batch of writes over any tables, committed as one transaction when its ``with``
        block exits, dropped if the block raises. See ``Batch``."""
        return Batch(self)

    def sync(self) -> None:
        """Flush committed transactions to disk (useful with ``sync=False``); blocks on
        ``fsync``. Raises ``JournalError``."""
        self._call(lambda env: env.sync(True))

    def statistics(self) -> JournalStatistics:
        """Sizes and reader use. Raises ``JournalError`` on a closed journal."""

        def read(env: lmdb.Environment) -> JournalStatistics:
            info, stat = env.info(), env.stat()
            return JournalStatistics(
                path=self._path,
                map_size=info["map_size"],
                max_map_size=self._max_map_size,
                used_bytes=(info["last_pgno"] + 1) * stat["psize"],
                readers=info["num_readers"],
                max_readers=info["max_readers"],
            )

        return self._call(read)

    # ---- Running transactions (protocol 3) ----

    def _live_env(self) -> lmdb.Environment:
        """The environment, or a JournalError that says why there is none. Lock held."""
        if self._pid != os.getpid():
            raise JournalError(
                f"journal {self._path} was opened by pid {self._pid} and cannot be used in "
                f"forked child {os.getpid()} (LMDB forbids it); call reopen() in the child"
            )
        if self._env is None:
            raise JournalError(f"journal {self._path} is closed")
        return self._env

    def _db(self, env: lmdb.Environment, name: str) -> lmdb._Database:
        """The handle of table ``name``, opened (and created) once per environment. Lock
        held, no transaction live: open_db runs a write transaction of its own, which may
        fill the map like any write (the caller's retry loop handles that). Handles are
        opened outside the callers' transactions because a handle opened inside one that
        then aborts (MDB_MAP_FULL) would be closed under the cache."""
        db = self._dbs.get(name)
        if db is None:
            db = env.open_db(name.encode(), create=True)
            self._dbs[name] = db
        return db

    def _call(self, body: Callable[[lmdb.Environment], _T]) -> _T:
        """Run ``body`` on the environment under the lock, outside any transaction."""
        return self._retrying(body)

    def _run(self, body: Callable[[_Txn], _T], *, write: bool, tables: tuple[str, ...] = ()) -> _T:
        """Run ``body`` in one transaction under the lock, with ``tables`` opened first."""

        def transaction(env: lmdb.Environment) -> _T:
            for name in tables:
                self._db(env, name)
            with env.begin(write=write) as txn:
                return body(txn)

        return self._retrying(transaction)

    def _retrying(self, body: Callable[[lmdb.Environment], _T]) -> _T:
        """Run ``body`` under the lock, growing the map and replaying on MDB_MAP_FULL,
        adopting another process's growth on MDB_MAP_RESIZED. Maps every other LMDB error
        to JournalError. A failed ``with env.begin()`` block has aborted its transaction,
        so replaying is safe."""
        with self._lock:
            env = self._live_env()
            while True:
                try:
                    return body(env)
                except lmdb.MapFullError:
                    self._grow(env)  # the transaction aborted; replay it on a bigger map
                except lmdb.MapResizedError:
                    env.set_mapsize(0)  # another process grew the map: adopt its size
                    self._map_size = env.info()["map_size"]
                except lmdb.DbsFullError as exc:
                    raise JournalError(
                        f"journal {self._path}: more than max_dbs={self._max_dbs} tables"
                    ) from exc
                except lmdb.Error as exc:
                    raise JournalError(f"journal {self._path}: {exc}") from exc

    def _grow(self, env: lmdb.Environment) -> None:
        current = env.info()["map_size"]
        if current >= self._max_map_size:
            raise JournalFullError(
                f"journal {self._path} is full: the map reached its cap of "
                f"{self._max_map_size} bytes (max_map_size)"
            )
        new = min(current * 2, self._max_map_size)
        try:
            env.set_mapsize(new)  # legal: the lock guarantees no live transaction here
        except lmdb.Error as exc:
            raise JournalError(f"journal {self._path}: cannot grow map: {exc}") from exc
        self._map_size = new

    def _check_key(self, key: bytes) -> None:
        if not isinstance(key, bytes):
            raise JournalError(f"journal keys are bytes, not {type(key).__qualname__}")
        if not 0 < len(key) <= self._max_key:
            raise JournalError(f"journal keys are 1 to {self._max_key} bytes, got {len(key)}")

    def _apply(self, ops: list[_Op]) -> list[bool]:
        """Apply recorded operations in one write transaction; per op: put -> True,
        delete -> whether the key existed."""
        for _, key, value in ops:
            self._check_key(key)
            if value is not None and not isinstance(value, bytes):
                raise JournalError(f"journal values are bytes, not {type(value).__qualname__}")

        dbs = self._dbs

        def write(txn: _Txn) -> list[bool]:
            out = []
            for name, key, value in ops:
                db = dbs[name]
                if value is None:
                    out.append(txn.delete(key, db=db))
                else:
                    out.append(txn.put(key, value, db=db))
            return out

        return self._run(write, write=True, tables=tuple({name for name, _, _ in ops}))


class Table:
    """A named table of a journal: bytes keys (1-511 bytes) to bytes values, sorted by key.

    Each call is its own transaction; for several writes that must land together use
    ``Journal.batch()``. Every method may raise ``JournalError`` (``JournalFullError`` for a
    write that does not fit).
    """

    __slots__ = ("journal", "name")

    def __init__(self, journal: Journal, name: str) -> None:
        self.journal = journal  #: the journal holding the table
        self.name = name  #: the table's name

    def __repr__(self) -> str:
        return f"<Table {self.name!r} of {self.journal!r}>"

    def get(self, key: bytes) -> bytes | None:
        """The value stored under ``key``, or None."""
        journal, name = self.journal, self.name
        journal._check_key(key)
        return journal._run(
            lambda txn: txn.get(key, db=journal._dbs[name]), write=False, tables=(name,)
        )

    def put(self, key: bytes, value: bytes) -> None:
        """Store ``value`` under ``key`` (replacing any value); durable on return per the
        journal's ``sync`` setting."""
        self.journal._apply([(self.name, key, value)])

    def delete(self, key: bytes) -> bool:
        """Remove ``key``; returns whether it was there."""
        return self.journal._apply([(self.name, key, None)])[0]

    def scan(self, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """(key, value) pairs whose key starts with ``prefix``, in key order: a snapshot taken
        in one read transaction and copied out before this returns (so the iterator holds no
        LMDB resources; size the ranges you scan accordingly)."""
        journal, name = self.journal, self.name
        if prefix:
            journal._check_key(prefix)

        def read(txn: _Txn) -> list[tuple[bytes, bytes]]:
            out: list[tuple[bytes, bytes]] = []
            with txn.cursor(db=journal._dbs[name]) as cursor:
                if not cursor.set_range(prefix):
                    return out
                for key, value in cursor.iternext():
                    if not key.startswith(prefix):
                        break
                    out.append((key, value))
            return out

        return iter(journal._run(read, write=False, tables=(name,)))

    def count(self) -> int:
        """Number of entries in the table."""
        journal, name = self.journal, self.name
        return journal._run(
            lambda txn: txn.stat(journal._dbs[name])["entries"], write=False, tables=(name,)
        )


class Batch:
    """Writes over any tables of one journal that commit together or not at all.

        with journal.batch() as b:
            b.put(states, b"a1", data)
            b.delete(pending, b"t7")
        # committed here, once; an exception in the block drops every operation

    Operations are recorded and applied in order at exit, in one write transaction (so the
    block itself holds no lock, and reads inside it do not see its writes). Exiting raises
    ``JournalError``/``JournalFullError`` if the commit fails; then nothing was applied.
    """

    __slots__ = ("_done", "_journal", "_ops")

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self._ops: list[_Op] = []
        self._done = False

    def put(self, table: Table | str, key: bytes, value: bytes) -> None:
        """Record: store ``value`` under ``key`` in ``table``."""
        self._ops.append((self._name(table), key, value))

    def delete(self, table: Table | str, key: bytes) -> None:
        """Record: remove ``key`` from ``table`` (no error if absent)."""
        self._ops.append((self._name(table), key, None))

    def __len__(self) -> int:
        return len(self._ops)

    def _name(self, table: Table | str) -> str:
        if self._done:
            raise JournalError("this batch has already been committed or dropped")
        if isinstance(table, Table):
            if table.journal is not self._journal:
                raise JournalError(f"{table!r} belongs to another journal")
            return table.name
        return self._journal.table(table).name

    def commit(self) -> None:
        """Apply the recorded operations now (the ``with`` block calls this at exit)."""
        if self._done:
            raise JournalError("this batch has already been committed or dropped")
        self._done = True
        if self._ops:
            self._journal._apply(self._ops)

    def __enter__(self) -> Batch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self._done = True
            self._ops.clear()


# ---- Fork hook (protocol 4) ----


# The journals whose locks _before_fork took, to release in exactly those after the fork.
_locked_for_fork: list[Journal] = []


def _before_fork() -> None:
    # Take every journal's lock so that no transaction is live when the child is made;
    # sorted by id for one global order (two forking threads cannot deadlock).
    for journal in sorted(_open_journals, key=id):
        journal._lock.acquire()
        _locked_for_fork.append(journal)


def _after_fork_in_parent() -> None:
    while _locked_for_fork:
        _locked_for_fork.pop()._lock.release()


#: Environments a forked child inherited, by real path: never used, and closed only when this
#: process opens the same path again (py-lmdb refuses a second handle on one path per
#: process); a sandboxed tool's child never does, so it never closes one.
_inherited: dict[str, lmdb.Environment] = {}


def inherit(path: str, env: lmdb.Environment) -> None:
    """Keep ``env``, inherited across a fork, unclosed (``_after_fork_in_child``)."""
    _inherited[os.path.realpath(path)] = env


def release_inherited(path: str) -> None:
    """Close the inherited environment of ``path``, if any, before opening it afresh."""
    env = _inherited.pop(os.path.realpath(path), None)
    if env is not None:
        with contextlib.suppress(lmdb.Error):
            env.close()


def _after_fork_in_child() -> None:
    _locked_for_fork.clear()  # the child replaces these locks below
    for journal in list(_open_journals):
        journal._lock = threading.Lock()
        env, journal._env = journal._env, None
        journal._dbs.clear()
        if env is not None:
            # Not closed here, nor freed (its dealloc would close it): py-lmdb's close()
            # waits for operations in flight, and one that another thread of the parent was
            # in at the fork never ends in the child, which then hung for ever. Closed when
            # this child opens the path again (release_inherited), never otherwise.
            inherit(journal._path, env)
        _open_journals.discard(journal)
        # journal._pid stays the parent's: calls raise the "use reopen()" JournalError.


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)
