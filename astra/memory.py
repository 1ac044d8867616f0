"""``astra.memory``: agent memory, built as a plugin on the kernel's extension API
(``astra.plugin``), the same one a third party uses.

Namespaces of key/value pairs, append-only logs and vector recall live in one LMDB
environment under the kernel's data dir (``<data_dir>/plugins.d/memory``), stored by
``kernel.memory.MemoryStore``. Each worker opens it (memory-mapped) on first use.

    agent in wNN: self.memory.get(k) ------------------> MemoryStore (wNN's own mmap)
    client: k.memory("team").get(k) --task "memory.get"--> any worker --> MemoryStore
            <------------------------ reply -------------'

- *Inside an agent*, ``self.memory`` is the agent's own namespace (named after the agent)
  and ``self.shared_memory("team")`` a shared one, which needs a grant at spawn
  (``k.spawn(Cls, memory=["team"])``); any other namespace raises ``CapabilityError``.
  Reads and writes go straight to the map in the agent's worker: no message, no round trip.
  A write blocks the agent's worker for its commit (an fsync with ``SYNC``).
- *From a client* (trusted: any namespace), ``k.memory("team")`` calls the plugin's
  services (``memory.get``, ``memory.put``...), each a task on a worker.

Values are anything msgpack holds, plus numpy arrays stored raw (kernel/memory.py). Writes
are transactions: each call one, ``batch()`` one for all its operations. Durability:
``ASTRA_MEMORY_SYNC=1`` (the default) fsyncs every commit before it returns, surviving a
SIGKILL and a power loss; ``0`` survives a SIGKILL of any process but a machine crash may
lose the last commits (never the file's integrity).
"""

from __future__ import annotations

__all__ = ["SYNC", "Batch", "Hit", "Memory", "MemoryPlugin"]

import os
import threading
from typing import TYPE_CHECKING, Final, NamedTuple, Protocol

from kernel.memory import MemoryStore
from kernel.plugins import AgentInfo, Plugin, PluginContext

from ._errors import CapabilityError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from types import TracebackType

    import numpy.typing as npt

    from kernel.memory import Namespace

    from ._client import Client

#: Fsync every commit (see the module doc). ``ASTRA_MEMORY_SYNC=0`` turns it off.
SYNC: Final = os.getenv("ASTRA_MEMORY_SYNC", "1").lower() not in ("0", "false", "no")
#: How long a client waits for a memory service call.
CALL_TIMEOUT_S: Final = float(os.getenv("ASTRA_MEMORY_TIMEOUT_S", "60"))


class Hit(NamedTuple):
    """One result of ``Memory.search``: the vector's id, its cosine similarity to the query
    (1.0 is the same direction) and the meta stored with it."""

    id: str
    score: float
    meta: object


class Batch(Protocol):
    """What ``Memory.batch()`` returns: puts and deletes applied in one transaction when
    the ``with`` block exits, or not at all if it raises."""

    def put(self, key: str, value: object) -> None: ...

    def delete(self, key: str) -> None: ...

    def __enter__(self) -> Batch: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class Memory:
    """One memory namespace: key/value pairs, logs and vectors.

    From ``k.memory(name)`` (a client: every call is a service call to a worker, which
    blocks until it answers) or, inside an agent, ``self.memory`` and
    ``self.shared_memory(name)`` (every call reads or writes the worker's own map). The
    methods are those of ``kernel.memory.Namespace``; each raises
    ``astra.errors.MemoryStoreError`` for a bad argument, an unstorable value or a storage
    failure (``DimensionMismatchError`` for a vector of the wrong length).
    """

    __slots__ = ("_ns", "name")

    def __init__(self, name: str, ns: Namespace | _RemoteNamespace) -> None:
        self.name = name  #: the namespace's name
        self._ns = ns

    def __repr__(self) -> str:
        where = "remote" if isinstance(self._ns, _RemoteNamespace) else "local"
        return f"<astra.Memory {self.name!r} ({where})>"

    # ---- Key/value ----

    def get(self, key: str, default: object = None) -> object:
        """The value under ``key``, or ``default``. Arrays come back as fresh copies."""
        return self._ns.get(key, default)

    def get_many(self, keys: Sequence[str], default: object = None) -> list[object]:
        """The values of ``keys``, read in one snapshot."""
        return self._ns.get_many(keys, default)

    def put(self, key: str, value: object) -> None:
        """Store ``value`` under ``key`` (one transaction, durable on return with ``SYNC``)."""
        self._ns.put(key, value)

    def delete(self, key: str) -> bool:
        """Remove ``key``; returns whether it was there."""
        return self._ns.delete(key)

    def scan(self, prefix: str = "") -> list[tuple[str, object]]:
        """``(key, value)`` for every key starting with ``prefix``, in key order, from one
        snapshot."""
        return list(self._ns.scan(prefix))

    def batch(self) -> Batch:
        """``with m.batch() as b: b.put(...); b.delete(...)``: one transaction at exit."""
        return self._ns.batch()

    # ---- Logs ----

    def append(self, log: str, item: object) -> int:
        """Append ``item`` to ``log``; returns its sequence number (0, 1, 2... per log,
        unique across processes)."""
        return self._ns.append(log, item)

    def range(
        self, log: str, since: float | None = None, until: float | None = None, *, by: str = "seq"
    ) -> list[tuple[int, object]]:
        """``(seq, item)`` from ``since`` (included) to ``until`` (excluded), oldest first:
        sequence numbers, or wall-clock times with ``by="time"``."""
        return self._ns.range(log, since, until, by=by)  # type: ignore[arg-type]

    def tail(self, log: str, n: int) -> list[object]:
        """The last ``n`` items of ``log``, oldest first."""
        return self._ns.tail(log, n)

    # ---- Vectors ----

    def add(self, id: str, vector: npt.ArrayLike, meta: object = None) -> None:
        """Store ``vector`` (normalized, float32) under ``id`` with ``meta`` (a dict, for
        ``where`` filters); replaces ``id``'s earlier vector."""
        self._ns.add(id, vector, meta)

    def add_many(
        self, ids: Sequence[str], vectors: npt.ArrayLike, metas: Sequence[object] | None = None
    ) -> None:
        """``add`` for many vectors in one transaction (a 2-D array: one row per id)."""
        self._ns.add_many(ids, vectors, metas)  # type: ignore[arg-type]

    def remove(self, id: str) -> bool:
        """Remove ``id``'s vector; returns whether it was there."""
        return self._ns.remove(id)

    def search(
        self, vector: npt.ArrayLike, k: int = 10, where: Mapping[str, object] | None = None
    ) -> list[Hit]:
        """The ``k`` stored vectors most similar to ``vector`` (exact cosine), best first;
        ``where`` keeps only those whose meta holds each key with an equal value."""
        return [Hit(*hit) for hit in self._ns.search(vector, k, where)]


# ---- Client side: every call is a service call ----


class _RemoteNamespace:
    """``Namespace``'s methods as calls of the memory plugin's services (a client's)."""

    __slots__ = ("_client", "_name")

    def __init__(self, client: Client, name: str) -> None:
        self._client = client
        self._name = name

    def _call(self, op: str, *args: object) -> object:
        return self._client.call_service(f"memory.{op}", self._name, *args).result(CALL_TIMEOUT_S)

    def get(self, key: str, default: object = None) -> object:
        return self._call("get", key, default)

    def get_many(self, keys: Sequence[str], default: object = None) -> list[object]:
        return self._call("get_many", list(keys), default)  # type: ignore[return-value]

    def put(self, key: str, value: object) -> None:
        self._call("put", key, value)

    def delete(self, key: str) -> bool:
        return bool(self._call("delete", key))

    def scan(self, prefix: str = "") -> list[tuple[str, object]]:
        return self._call("scan", prefix)  # type: ignore[return-value]

    def batch(self) -> _RemoteBatch:
        return _RemoteBatch(self)

    def append(self, log: str, item: object) -> int:
        return self._call("append", log, item)  # type: ignore[return-value]

    def range(
        self, log: str, since: float | None, until: float | None, *, by: str
    ) -> list[tuple[int, object]]:
        return self._call("range", log, since, until, by)  # type: ignore[return-value]

    def tail(self, log: str, n: int) -> list[object]:
        return self._call("tail", log, n)  # type: ignore[return-value]

    def add(self, id: str, vector: npt.ArrayLike, meta: object) -> None:
        self._call("add", id, vector, meta)

    def add_many(
        self, ids: Sequence[str], vectors: npt.ArrayLike, metas: Sequence[object] | None
    ) -> None:
        self._call("add_many", list(ids), vectors, None if metas is None else list(metas))

    def remove(self, id: str) -> bool:
        return bool(self._call("remove", id))

    def search(
        self, vector: npt.ArrayLike, k: int, where: Mapping[str, object] | None
    ) -> list[tuple[str, float, object]]:
        where = None if where is None else dict(where)
        return self._call("search", vector, k, where)  # type: ignore[return-value]


class _RemoteBatch:
    """A client's batch: operations recorded here, sent as one ``memory.batch`` call (one
    transaction) when the block exits without an exception."""

    __slots__ = ("_ns", "_ops")

    def __init__(self, ns: _RemoteNamespace) -> None:
        self._ns = ns
        self._ops: list[tuple[str, object]] = []  # (key, value); _DELETE deletes

    def put(self, key: str, value: object) -> None:
        self._ops.append((key, value))

    def delete(self, key: str) -> None:
        self._ops.append((key, _DELETE))

    def __enter__(self) -> _RemoteBatch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        ops, self._ops = self._ops, []
        if exc_type is None and ops:
            puts = [(k, v) for k, v in ops if v is not _DELETE]
            order = [(k, v is _DELETE) for k, v in ops]
            self._ns._call("batch", order, [v for _, v in puts])


class _Delete:
    """The marker of a delete in a client's batch."""


_DELETE: Final = _Delete()


# ---- Agent side: the worker's own map, within the agent's grants ----


class AgentMemory:
    """What ``self.plugin("memory")`` is inside an agent; ``self.memory`` and
    ``self.shared_memory(name)`` call ``namespace``."""

    __slots__ = ("_info", "_plugin", "_views")

    def __init__(self, plugin: MemoryPlugin, info: AgentInfo) -> None:
        self._plugin = plugin
        self._info = info
        self._views: dict[str, Memory] = {}

    def namespace(self, name: str | None = None) -> Memory:
        """The agent's own namespace (``name`` None or its own name), or the shared
        namespace ``name`` if the agent was granted it at spawn.

        Raises:
            CapabilityError: ``name`` was not granted (``k.spawn(Cls, memory=[name])``).
        """
        name = self._info.id if name is None else name
        view = self._views.get(name)
        if view is None:
            if name != self._info.id and name not in self._info.grants:
                raise CapabilityError(
                    f"agent {self._info.id!r} was not granted the memory namespace {name!r} "
                    f"(spawn it with memory=[{name!r}])"
                )
            view = self._views[name] = Memory(name, self._plugin.store().namespace(name))
        return view


# ---- The plugin ----


class MemoryPlugin(Plugin):
    """The memory service: per-process store, services for clients, an agent API."""

    name = "memory"

    def __init__(self) -> None:
        self._ctx: PluginContext | None = None
        self._store: MemoryStore | None = None
        self._lock = threading.Lock()

    def setup(self, ctx: PluginContext) -> None:
        self._ctx = ctx
        for op in ("get", "get_many", "put", "delete", "scan", "batch", "append", "range",
                   "tail", "add", "add_many", "remove", "search"):  # fmt: skip
            ctx.service(op, getattr(self, f"_{op}"))
        ctx.agent_api(lambda info: AgentMemory(self, info))

    def store(self) -> MemoryStore:
        """This process's store, opened on first use."""
        store = self._store
        if store is None:
            with self._lock:
                if self._store is None:
                    assert self._ctx is not None, "setup() has not run"
                    self._store = MemoryStore(self._ctx.path(), sync=SYNC)
                store = self._store
        return store

    def close(self) -> None:
        with self._lock:
            store, self._store = self._store, None
        if store is not None:
            store.close()

    def _ns(self, name: str) -> Namespace:
        return self.store().namespace(name)

    # ---- Services (a client's calls, run in a worker) ----

    def _get(self, ns: str, key: str, default: object = None) -> object:
        return self._ns(ns).get(key, default)

    def _get_many(self, ns: str, keys: list[str], default: object = None) -> list[object]:
        return self._ns(ns).get_many(keys, default)

    def _put(self, ns: str, key: str, value: object) -> None:
        self._ns(ns).put(key, value)

    def _delete(self, ns: str, key: str) -> bool:
        return self._ns(ns).delete(key)

    def _scan(self, ns: str, prefix: str = "") -> list[tuple[str, object]]:
        return list(self._ns(ns).scan(prefix))

    def _batch(self, ns: str, order: list[tuple[str, bool]], values: list[object]) -> None:
        puts = iter(values)
        with self._ns(ns).batch() as batch:
            for key, is_delete in order:
                if is_delete:
                    batch.delete(key)
                else:
                    batch.put(key, next(puts))

    def _append(self, ns: str, log: str, item: object) -> int:
        return self._ns(ns).append(log, item)

    def _range(
        self, ns: str, log: str, since: float | None, until: float | None, by: str = "seq"
    ) -> list[tuple[int, object]]:
        return self._ns(ns).range(log, since, until, by=by)  # type: ignore[arg-type]

    def _tail(self, ns: str, log: str, n: int) -> list[object]:
        return self._ns(ns).tail(log, n)

    def _add(self, ns: str, id: str, vector: npt.ArrayLike, meta: object = None) -> None:
        self._ns(ns).add(id, vector, meta)

    def _add_many(
        self, ns: str, ids: list[str], vectors: npt.ArrayLike, metas: list[object] | None
    ) -> None:
        self._ns(ns).add_many(ids, vectors, metas)  # type: ignore[arg-type]

    def _remove(self, ns: str, id: str) -> bool:
        return self._ns(ns).remove(id)

    def _search(
        self, ns: str, vector: npt.ArrayLike, k: int = 10, where: dict[str, object] | None = None
    ) -> list[Hit]:
        return [Hit(*hit) for hit in self._ns(ns).search(vector, k, where)]
