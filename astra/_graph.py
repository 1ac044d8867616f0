"""``astra.Graph``: an explicit task graph, run by the client with bounded memory, and
durable graphs journaled in LMDB.

``g.add(fn, *args, **kwargs)`` returns a ``Node``; a ``Node`` among another node's
arguments (at any depth of lists, tuples and dict values) is an edge, and ``g.ref(name)``
refers to a node added later by name (so a graph can be written in any order, and can
have a cycle, which ``run`` refuses with ``CycleError`` naming it).

``Client.run(g)`` checks the graph (Kahn's algorithm over a compact adjacency: two int
arrays), then submits ready nodes as tasks, at most ``WINDOW`` in flight, and feeds each
result to its dependents. A node that fails fails every node below it with
``UpstreamError`` naming the root failure; other branches go on. A worker death re-runs
only the tasks that were on it (``retries``); finished results are already in this process.

Memory (the scheduler here is the client process): per pending node, a ``Node``, its spec
tuple with its argument tuple, a slot in the graph's lists, an in-degree and CSR offset in
arrays (12 B) and 8 B per edge: 335 B per node of a 100,000-node graph of one small
argument each, measured with tracemalloc by ``tests/astra/test_graph.py`` (which asserts
under 1 KiB). A ``Future`` and a ``_Task`` exist only while a node is in flight (at most
``WINDOW``).

Durable graphs (``run(g, durable=True, name=...)``): every node must be a function
importable by module path (refused at ``run`` otherwise); completed nodes' results are
committed to the LMDB journal ``<state_dir>/graphs`` (table ``graph:<name>``, one
transaction per batch of completions, synced) before their dependents are submitted. After
a crash of ``astrad`` or of this process, ``run`` of the same graph or ``resume(name)``
(which reloads the graph saved at the first run) runs only the nodes without a committed
result. A node running when the crash came may have run once already (at-least-once for
those); a node with a committed result never runs again.
"""

from __future__ import annotations

__all__ = ["META_KEY", "WINDOW", "Graph", "Node", "load_graph", "run_graph", "save_graph"]

import collections
import concurrent.futures
import contextlib
import functools
import os
import pickle
import queue
import time
from array import array
from typing import TYPE_CHECKING, Final

from kernel import shipping

from . import _deps
from ._errors import CycleError, SerializationError, UpstreamError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from kernel.journal import Journal, Table

    from ._client import Client, _Task

#: Tasks of one ``run`` in flight at once.
WINDOW: Final = int(os.getenv("ASTRA_GRAPH_WINDOW", "8192"))
#: Completions committed to a durable graph's journal per transaction, at most.
JOURNAL_BATCH: Final = 1024

_PENDING, _DONE, _FAILED = 0, 1, 2
#: The journal key of a durable graph's saved definition (node names cannot start with NUL).
META_KEY: Final = b"\x00graph"


class Node:
    """A node of a ``Graph``: pass it as an argument of another ``add`` to make an edge;
    ``run`` returns a dict keyed by nodes."""

    __slots__ = ("_index", "name")

    def __init__(self, index: int, name: str | None) -> None:
        self._index = index  # -1: a forward reference not added yet
        self.name = name

    @property
    def index(self) -> int:
        return self._index

    def __repr__(self) -> str:
        return f"<Node {self.name!r}>" if self.name else f"<Node #{self._index}>"

    # Equal by position and name, so the results of ``resume`` (which rebuilds the graph)
    # can be looked up with the nodes of the graph first run.
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Node):
            return NotImplemented
        return self._index == other._index and self.name == other.name

    def __hash__(self) -> int:
        return hash((self._index, self.name))

    def __reduce__(self) -> tuple[object, ...]:
        return (Node, (self._index, self.name))


class Graph:
    """A task graph: ``add`` nodes, then ``Client.run(graph)``. Not thread-safe."""

    def __init__(self) -> None:
        self._specs: list[tuple[object, ...]] = []  # (fn, args, kwargs, priority, retries, timeout)
        self._nodes: list[Node] = []
        self._names: dict[str, Node] = {}  # added and forward-referenced nodes by name

    def add(
        self,
        fn: Callable[..., object],
        /,
        *args: object,
        name: str | None = None,
        priority: int = 0,
        retries: int | None = None,
        timeout: float | None = None,
        **kwargs: object,
    ) -> Node:
        """Add ``fn(*args, **kwargs)`` as a node; ``Node``s among the arguments (at any
        depth) are its inputs. ``name`` must be unique; it binds ``ref(name)``."""
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        node: Node | None = None
        if name is not None:
            node = self._names.get(name)
            if node is not None and node._index >= 0:
                raise ValueError(f"a node named {name!r} is already in the graph")
        if node is None:
            node = Node(len(self._nodes), name)
            if name is not None:
                self._names[name] = node
        else:
            node._index = len(self._nodes)
        self._nodes.append(node)
        self._specs.append((fn, args, kwargs, priority, retries, timeout))
        return node

    def ref(self, name: str) -> Node:
        """The node named ``name``, or a reference to one to be added later."""
        node = self._names.get(name)
        if node is None:
            node = self._names[name] = Node(-1, name)
        return node

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(self._nodes)

    def __getitem__(self, name: str) -> Node:
        node = self._names.get(name)
        if node is None or node._index < 0:
            raise KeyError(name)
        return node

    def __repr__(self) -> str:
        return f"<astra.Graph of {len(self)} nodes>"

    # ---- Structure ----

    def _inputs(self, i: int) -> list[int]:
        _, args, kwargs = self._specs[i][:3]
        found = _deps.find(args, kwargs, Node)  # type: ignore[arg-type]
        out = []
        for node in found:
            assert isinstance(node, Node)
            if node._index < 0:
                raise ValueError(f"node {node.name!r} is referenced but never added")
            out.append(node._index)
        return list(dict.fromkeys(out)) if len(out) > 1 else out

    def _structure(self) -> tuple[array[int], array[int], array[int]]:
        """(in-degree per node, CSR offsets, CSR dependents). Raises ``CycleError``."""
        n = len(self._specs)
        indeg = array("i", bytes(4 * n))
        counts = array("q", bytes(8 * (n + 1)))
        inputs_of: list[list[int]] = []
        for i in range(n):
            inputs = self._inputs(i)
            inputs_of.append(inputs)
            indeg[i] = len(inputs)
            for j in inputs:
                counts[j + 1] += 1
        for i in range(n):
            counts[i + 1] += counts[i]
        edges = array("q", bytes(8 * counts[n]))
        fill = array("q", counts[:n])
        for i, inputs in enumerate(inputs_of):
            for j in inputs:
                edges[fill[j]] = i
                fill[j] += 1
        del inputs_of, fill
        self._check_acyclic(indeg, counts, edges)
        return indeg, counts, edges

    def _check_acyclic(self, indeg: array[int], offsets: array[int], edges: array[int]) -> None:
        left = array("i", indeg)
        ready = [i for i in range(len(left)) if not left[i]]
        seen = 0
        while ready:
            i = ready.pop()
            seen += 1
            for k in range(offsets[i], offsets[i + 1]):
                d = edges[k]
                left[d] -= 1
                if not left[d]:
                    ready.append(d)
        if seen == len(left):
            return
        # Every node left over has an input left over: walk inputs until one repeats.
        start = next(i for i in range(len(left)) if left[i])
        path, where = [start], {start: 0}
        while True:
            nxt = next(j for j in self._inputs(path[-1]) if left[j])
            if nxt in where:
                cycle = [*path[where[nxt] :], nxt][::-1]  # in dependency direction
                nodes = [self._nodes[i] for i in cycle]
                names = " -> ".join(n.name or f"#{n.index}" for n in nodes)
                raise CycleError(f"the graph has a cycle: {names}", list(nodes))
            where[nxt] = len(path)
            path.append(nxt)

    def _check_durable(self) -> None:
        for i, spec in enumerate(self._specs):
            fn = spec[0]
            module = getattr(fn, "__module__", None)
            qualname = getattr(fn, "__qualname__", "")
            if not module or module == "__main__" or "<" in qualname:
                node = self._nodes[i]
                raise SerializationError(
                    f"durable graph node {node!r}: {fn!r} is not importable by module path "
                    "(define it at the top level of an importable module)"
                )

    def _key(self, i: int) -> bytes:
        """A node's journal key: its name, or ``#<index>`` for an unnamed one."""
        node = self._nodes[i]
        return (node.name or f"#{i}").encode()

    def _index_of(self, key: bytes) -> int:
        if key[:1] == b"#":
            return int(key[1:]) if key[1:].isdigit() else -1
        node = self._names.get(key.decode())
        return -1 if node is None else node._index


def run_graph(
    client: Client,
    graph: Graph,
    *,
    timeout: float | None,
    return_exceptions: bool,
    journal: Table | None,
    jenv: Journal | None,
) -> dict[Node, object]:
    """``Client.run``'s engine: see the module docstring."""
    n = len(graph)
    indeg, offsets, edges = graph._structure()
    state = bytearray(n)
    results: list[object] = [None] * n
    errors: dict[int, BaseException] = {}
    finished = 0
    ready: collections.deque[int] = collections.deque()
    done_q: queue.SimpleQueue[tuple[int, concurrent.futures.Future[object]]] = queue.SimpleQueue()
    deadline = None if timeout is None else time.monotonic() + timeout
    in_flight: dict[int, concurrent.futures.Future[object]] = {}

    def release(i: int) -> None:
        for k in range(offsets[i], offsets[i + 1]):
            d = edges[k]
            indeg[d] -= 1
            if not indeg[d] and state[d] == _PENDING:
                ready.append(d)

    def fail_below(i: int, exc: BaseException) -> int:
        root = exc.root if isinstance(exc, UpstreamError) else exc
        label = graph._nodes[i].name or f"#{i}"
        root_task = exc.root_task if isinstance(exc, UpstreamError) else f"node {label}"
        stack, count = [i], 0
        while stack:
            j = stack.pop()
            for k in range(offsets[j], offsets[j + 1]):
                d = edges[k]
                if state[d] == _PENDING:
                    state[d] = _FAILED
                    err = UpstreamError(f"upstream {root_task} failed: {root!r}", root, root_task)
                    err.__cause__ = root
                    errors[d] = err
                    count += 1
                    stack.append(d)
        return count

    if journal is not None:
        for key, value in journal.scan():
            if key == META_KEY:
                continue
            i = graph._index_of(key)
            if 0 <= i < n and state[i] == _PENDING:
                results[i] = pickle.loads(value)
                state[i] = _DONE
                finished += 1
        for i in range(n):
            if state[i] == _DONE:
                release(i)
        for i in range(n):
            if state[i] == _PENDING and not indeg[i] and i not in ready:
                ready.append(i)
    else:
        ready.extend(i for i in range(n) if not indeg[i])

    try:
        while finished < n:
            to_send: list[_Task] = []
            while ready and len(in_flight) < WINDOW:
                i = ready.popleft()
                try:
                    task = _task_for_node(client, graph, i, results)
                except SerializationError as exc:
                    state[i] = _FAILED
                    errors[i] = exc
                    finished += 1 + fail_below(i, exc)
                    continue
                in_flight[i] = task.future
                task.future.add_done_callback(functools.partial(_settled, done_q, i))
                to_send.append(task)
            if to_send:
                client._send(to_send, now=True)  # the ready nodes in one go, many to a slot
            if finished >= n:
                break
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"graph run: {n - finished} of {n} nodes unfinished")
            if len(in_flight) == 1 and done_q.empty():
                # A chain: wait on the one future itself, which takes the reply in this
                # thread (Client._lead) instead of a wake-up through the queue.
                with contextlib.suppress(
                    concurrent.futures.TimeoutError, concurrent.futures.CancelledError
                ):
                    next(iter(in_flight.values())).exception(left)
            try:
                batch = [done_q.get(timeout=left)]
            except queue.Empty:
                continue
            while len(batch) < JOURNAL_BATCH:
                try:
                    batch.append(done_q.get_nowait())
                except queue.Empty:
                    break
            commits: list[tuple[bytes, bytes]] = []
            for i, settled in batch:
                in_flight.pop(i, None)
                finished += 1
                failure: BaseException | None
                if settled.cancelled():
                    failure = concurrent.futures.CancelledError(f"node {graph._nodes[i]!r}")
                else:
                    failure = settled.exception()
                if failure is not None:
                    state[i] = _FAILED
                    errors[i] = failure
                    finished += fail_below(i, failure)
                    continue
                state[i] = _DONE
                results[i] = settled.result()
                if journal is not None:
                    commits.append((graph._key(i), shipping.dumps(results[i])))
            if commits and jenv is not None and journal is not None:
                with jenv.batch() as b:
                    for key, value in commits:
                        b.put(journal, key, value)
            for i, _ in batch:
                if state[i] == _DONE:
                    release(i)
    finally:
        for pending in in_flight.values():
            pending.cancel()
    if errors and not return_exceptions:
        first = (
            min(i for i, e in errors.items() if not isinstance(e, UpstreamError))
            if any(not isinstance(e, UpstreamError) for e in errors.values())
            else min(errors)
        )
        raise errors[first]
    out: dict[Node, object] = {}
    for i, node in enumerate(graph._nodes):
        out[node] = errors[i] if state[i] == _FAILED else results[i]
    return out


def _settled(
    done_q: queue.SimpleQueue[tuple[int, concurrent.futures.Future[object]]],
    i: int,
    fut: concurrent.futures.Future[object],
) -> None:
    done_q.put((i, fut))  # a done-callback: the run's thread does the rest


def _task_for_node(client: Client, graph: Graph, i: int, results: list[object]) -> _Task:
    """Node ``i`` as a task of ``client``, its inputs replaced by their results; not sent."""
    from ._client import DEFAULT_RETRIES  # a cycle at import time: _client imports us

    fn, args, kwargs, priority, retries, task_timeout = graph._specs[i]

    def resolve(node: object) -> object:
        assert isinstance(node, Node)
        return results[node._index]

    call_args = tuple(_deps.substitute(a, Node, resolve) for a in args)  # type: ignore[attr-defined]
    call_kwargs = {k: _deps.substitute(v, Node, resolve) for k, v in kwargs.items()}  # type: ignore[attr-defined]
    return client._new_task(
        fn,  # type: ignore[arg-type]
        call_args,
        call_kwargs,
        DEFAULT_RETRIES if retries is None else retries,  # type: ignore[arg-type]
        task_timeout,  # type: ignore[arg-type]
        priority,  # type: ignore[arg-type]
    )


def save_graph(graph: Graph) -> bytes:
    """A durable graph's definition, for ``resume``: functions by reference."""
    return pickle.dumps((graph._specs, [(nd._index, nd.name) for nd in graph._nodes]), 5)


def load_graph(data: bytes) -> Graph:
    specs, nodes = pickle.loads(data)
    g = Graph()
    g._specs = specs
    g._nodes = [Node(i, name) for i, name in nodes]
    g._names = {nd.name: nd for nd in g._nodes if nd.name}
    return g  # the specs hold copies of the Nodes: edges go by index, so they still work
