"""Agent memory on LMDB (kernel/memory.py): key/value, logs, vectors, SIGKILL, processes."""

from __future__ import annotations

import datetime
import itertools
import os
import select
import signal
import stat
import struct
import time

import lmdb
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kernel import memory
from kernel.errors import KernelError
from kernel.journal import MAX_READERS, release_inherited
from kernel.memory import (
    DimensionMismatchError,
    MemoryStore,
    MemoryStoreError,
    MemoryStoreFullError,
)
from tests.helpers import fork_child, reap

#: Tiny vector chunks (2 rows of dimension 8), so that tests cross chunk boundaries.
TINY_CHUNK_BYTES = 64


@pytest.fixture
def store(tmp_path):
    with MemoryStore(tmp_path / "m", sync=False, chunk_bytes=TINY_CHUNK_BYTES) as s:
        yield s


@pytest.fixture
def ns(store):
    return store.namespace("r1")


_fresh = itertools.count()


def fresh_ns(store):
    """A namespace no other hypothesis example has used."""
    return store.namespace(f"ex{next(_fresh)}")


# ---- Key/value ----


def test_put_get_delete(ns):
    assert ns.get("a") is None
    assert ns.get("a", "dflt") == "dflt"
    ns.put("a", {"x": 1, "y": [1, 2.5, "s", None, True, b"raw"]})
    assert ns.get("a") == {"x": 1, "y": [1, 2.5, "s", None, True, b"raw"]}
    ns.put("a", 2)
    assert ns.get("a") == 2
    ns.put("none", None)
    assert ns.get("none", "dflt") is None  # a stored None is not a missing key
    assert ns.delete("a") is True
    assert ns.delete("a") is False
    assert ns.get("a") is None


def test_values_come_back_as_msgpack_types(ns):
    when = datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.UTC)
    ns.put("v", {"t": (1, 2), "when": when, 3: "int key", "scalar": np.float32(1.5)})
    assert ns.get("v") == {"t": [1, 2], "when": when, 3: "int key", "scalar": 1.5}


def test_namespaces_are_separate(store):
    r1, r10, team = store.namespace("r1"), store.namespace("r10"), store.namespace("team")
    assert store.namespace("r1") is r1
    r1.put("k", "from r1")
    r10.put("k", "from r10")
    team.put("k", "shared")
    assert (r1.get("k"), r10.get("k"), team.get("k")) == ("from r1", "from r10", "shared")
    assert list(r1.scan()) == [("k", "from r1")]  # "r1" is a prefix of "r10": still apart
    r1.append("log", 1)
    r1.add("v", [1.0, 0.0])
    assert r10.tail("log", 5) == []
    assert r10.search([1.0, 0.0]) == []


def test_scan_by_prefix_is_a_sorted_snapshot(ns):
    for key in ("agent/2", "agent/1", "agent/10", "agenda", "b", "agent0", "é", "agent/\0nul"):
        ns.put(key, key.upper())
    it = ns.scan("agent/")
    ns.put("agent/3", "late")  # after the scan began: not in its snapshot
    assert list(it) == [
        ("agent/\0nul", "AGENT/\0NUL"),
        ("agent/1", "AGENT/1"),
        ("agent/10", "AGENT/10"),
        ("agent/2", "AGENT/2"),
    ]
    assert [k for k, _ in ns.scan()] == sorted(k for k, _ in ns.scan())
    assert [k for k, _ in ns.scan()][-1] == "é"  # UTF-8 order is code point order
    assert len(list(ns.scan())) == 9
    assert list(ns.scan("zzz")) == []


def test_get_many_reads_one_snapshot(ns):
    ns.put("a", 1)
    ns.put("b", 2)
    assert ns.get_many(["a", "missing", "b"], default=0) == [1, 0, 2]


def test_batch_commits_once_at_exit(ns):
    ns.put("gone", 1)
    with ns.batch() as b:
        b.put("x", 1)
        b.put("y", np.arange(3))
        b.delete("gone")
        b.delete("never-there")
        assert len(b) == 4
        assert ns.get("x") is None  # nothing applied before the block exits
    assert ns.get("x") == 1
    assert ns.get("y").tolist() == [0, 1, 2]
    assert ns.get("gone") is None
    with pytest.raises(MemoryStoreError, match="already been committed"):
        b.put("late", 1)


def test_an_exception_in_a_batch_applies_nothing(ns):
    ns.put("keep", "old")

    def failing_block():
        with ns.batch() as b:
            b.put("new", 1)
            b.put("keep", "overwritten")
            raise RuntimeError("abort")

    with pytest.raises(RuntimeError, match="abort"):
        failing_block()
    assert ns.get("new") is None
    assert ns.get("keep") == "old"


def test_an_unstorable_value_raises_inside_the_batch_and_nothing_applies(ns):
    b = ns.batch()
    b.put("fine", 1)
    with pytest.raises(MemoryStoreError, match="cannot encode"):
        b.put("bad", object())
    b.commit()  # the block would have raised; committing the rest is the caller's choice
    assert ns.get("fine") == 1
    assert ns.get("bad") is None

    def block():
        with ns.batch() as b:
            b.put("fine2", 1)
            b.put("bad", object())

    with pytest.raises(MemoryStoreError, match="cannot encode"):
        block()
    assert ns.get("fine2") is None


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["put", "delete", "batch"]),
            st.sampled_from(["a", "a/1", "a/2", "ab", "b", "b/\0", "é/x"]),
            st.integers(-5, 5),
        ),
        max_size=30,
    ),
    prefix=st.sampled_from(["", "a", "a/", "b", "é", "z"]),
)
def test_key_value_matches_a_dict(store, ops, prefix):
    ns, model = fresh_ns(store), {}
    for op, key, value in ops:
        if op == "put":
            ns.put(key, value)
            model[key] = value
        elif op == "delete":
            assert ns.delete(key) is (model.pop(key, None) is not None)
        else:
            with ns.batch() as b:
                b.put(key, value)
                b.delete(key + "/")
            model[key] = value
            model.pop(key + "/", None)
    assert dict(ns.scan()) == model
    want = sorted((k, v) for k, v in model.items() if k.encode().startswith(prefix.encode()))
    assert list(ns.scan(prefix)) == want
    assert all(ns.get(k) == v for k, v in model.items())


# ---- Numpy arrays ----


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.arange(5, dtype=np.int64),
        np.array([True, False]),
        np.array([1 + 2j, 3 - 4j]),
        np.arange(4, dtype=">i4"),  # non-native byte order
        np.array(7.5),  # 0-d
        np.zeros((0, 3), np.float64),  # empty
        np.array(["ab", "c"]),
        np.arange(3).astype("datetime64[s]"),
        np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        np.arange(20, dtype=np.int16)[::3],  # not contiguous
        np.random.default_rng(0).standard_normal((64, 384)).astype(np.float32),
    ],
    ids=lambda a: f"{a.dtype.str}{list(a.shape)}",
)
def test_numpy_arrays_round_trip(ns, arr):
    ns.put("arr", arr)
    got = ns.get("arr")
    assert isinstance(got, np.ndarray)
    assert got.dtype == arr.dtype
    assert got.shape == arr.shape
    np.testing.assert_array_equal(got, arr)


def test_arrays_come_back_as_private_writable_copies(ns):
    ns.put("a", {"emb": np.ones(4, np.float32), "n": 1})
    first = ns.get("a")["emb"]
    assert first.flags.writeable
    first[:] = 5  # mutating our copy does not reach the store
    again = ns.get("a")["emb"]
    assert again.tolist() == [1.0] * 4
    assert not np.shares_memory(first, again)


@pytest.mark.parametrize(
    "value",
    [np.array([object()]), np.zeros(2, dtype=[("a", "i4"), ("b", "f4")]), object(), 1 << 70],
    ids=["object-dtype", "structured", "object", "huge-int"],
)
def test_unstorable_values_raise_a_typed_error(ns, value):
    with pytest.raises(MemoryStoreError, match="cannot encode"):
        ns.put("bad", value)
    assert ns.get("bad") is None


# ---- Names, errors, files ----


def test_bad_names_and_keys_raise_memory_store_error(store, ns):
    assert issubclass(MemoryStoreError, KernelError)
    assert not issubclass(MemoryStoreError, MemoryError)
    for bad in ("", "a\0b", "x" * 81, 7):
        with pytest.raises(MemoryStoreError, match="namespace name"):
            store.namespace(bad)
    store.namespace("é" * 40)  # 80 bytes: the limit
    for bad_key in ("", "k" * 401, b"bytes"):
        with pytest.raises(MemoryStoreError, match="key"):
            ns.put(bad_key, 1)
    with pytest.raises(MemoryStoreError, match="log name"):
        ns.append("a\0b", 1)
    with pytest.raises(MemoryStoreError, match="index name"):
        ns.add("id", [1.0], index="")
    with pytest.raises(MemoryStoreError, match="vector id"):
        ns.add("", [1.0])


def test_close_is_idempotent_and_the_data_outlives_the_handle(tmp_path):
    s = MemoryStore(tmp_path / "m")
    ns = s.namespace("r1")
    ns.put("k", "v")
    s.close()
    s.close()
    assert s.closed
    with pytest.raises(MemoryStoreError, match="closed"):
        ns.get("k")
    with MemoryStore(tmp_path / "m") as again:
        assert again.namespace("r1").get("k") == "v"


def test_files_are_private(tmp_path):
    path = tmp_path / "state" / "memory"
    with MemoryStore(path):
        pass
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    for name in ("data.mdb", "lock.mdb"):
        assert stat.S_IMODE(os.stat(path / name).st_mode) == 0o600


def test_the_map_grows_and_past_its_cap_a_write_applies_nothing(tmp_path):
    with MemoryStore(tmp_path / "m", sync=False, map_size=64 << 10, max_map_size=1 << 20) as s:
        ns = s.namespace("r1")
        for i in range(50):  # ~200 KB through a 64 KiB map
            ns.put(f"{i:04d}", os.urandom(4000))
        assert s.statistics().map_size >= 256 << 10
        b = ns.batch()
        for i in range(400):  # 1.6 MB in one transaction: past the cap
            b.put(f"big{i}", bytes(4000))
        with pytest.raises(MemoryStoreFullError, match="max_map_size"):
            b.commit()
        assert list(ns.scan("big")) == []
        ns.put("after", 1)  # smaller writes still work
        assert len(list(ns.scan())) == 51


# ---- Logs ----


def test_append_numbers_each_log_from_zero(ns):
    assert [ns.append("events", i) for i in range(3)] == [0, 1, 2]
    assert ns.append("other", "x") == 0
    assert ns.append("events", {"i": 3}) == 3
    assert ns.range("events") == [(0, 0), (1, 1), (2, 2), (3, {"i": 3})]
    assert ns.range("other") == [(0, "x")]
    assert ns.range("unknown") == []


def test_range_by_sequence_is_half_open(ns):
    for i in range(10):
        ns.append("events", f"e{i}")
    assert ns.range("events", 3, 6) == [(3, "e3"), (4, "e4"), (5, "e5")]
    assert [s for s, _ in ns.range("events", since=8)] == [8, 9]
    assert [s for s, _ in ns.range("events", until=2)] == [0, 1]
    assert ns.range("events", 6, 6) == []
    assert ns.range("events", 20) == []
    for bad in (-1, 1.5, True):
        with pytest.raises(MemoryStoreError, match="sequence bounds"):
            ns.range("events", bad)
    with pytest.raises(MemoryStoreError, match="by must be"):
        ns.range("events", by="size")


def test_range_by_time_uses_the_stamps_which_never_decrease(ns, monkeypatch):
    clock = iter(
        [100.0, 101.0, 99.0, 105.0, 105.0, 110.0, 50.0, 50.0, 50.0]
    )  # 99: the clock stepped back
    monkeypatch.setattr(memory, "_wall_clock", lambda: next(clock))
    for i in range(6):
        ns.append("events", i)
    # stamps: 100, 101, 101 (raised), 105, 105, 110
    assert ns.range("events", 101, 105, by="time") == [(1, 1), (2, 2)]
    assert [s for s, _ in ns.range("events", 101.5, by="time")] == [3, 4, 5]
    assert [s for s, _ in ns.range("events", 100.5, by="time")] == [1, 2, 3, 4, 5]
    assert [s for s, _ in ns.range("events", until=100.5, by="time")] == [0]
    assert ns.range("events", 111, by="time") == []
    assert ns.range("events", 0, 1000, by="time") == ns.range("events")
    assert ns.range("unknown", 0, 1000, by="time") == []
    with pytest.raises(MemoryStoreError, match="time bounds"):
        ns.range("events", "yesterday", by="time")
    for i in range(6, 9):  # the clock stays back: stamps hold at 110, never below
        ns.append("events", i)
    assert [s for s, _ in ns.range("events", 100.5, by="time")] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [s for s, _ in ns.range("events", 110, by="time")] == [5, 6, 7, 8]


def test_tail_returns_the_last_items_oldest_first(ns):
    assert ns.tail("events", 3) == []
    for i in range(5):
        ns.append("events", i)
    ns.append("eventsX", "other log")  # a log whose name extends this one's
    assert ns.tail("events", 2) == [3, 4]
    assert ns.tail("events", 50) == [0, 1, 2, 3, 4]
    assert ns.tail("events", 0) == []
    with pytest.raises(MemoryStoreError, match="n must be"):
        ns.tail("events", -1)


def test_logs_continue_after_reopening(tmp_path):
    with MemoryStore(tmp_path / "m") as s:
        assert [s.namespace("r1").append("ev", i) for i in range(3)] == [0, 1, 2]
    with MemoryStore(tmp_path / "m") as s:
        assert s.namespace("r1").append("ev", 3) == 3
        assert s.namespace("r1").tail("ev", 10) == [0, 1, 2, 3]


# ---- Vectors ----


def _reference(model, query, k, where=None):
    """Brute-force top-k cosine over ``model`` ({id: (vector, meta)}), in float64."""
    q = np.asarray(query, np.float64)
    q /= np.linalg.norm(q)
    scored = []
    for id_, (vec, meta) in model.items():
        if where and not (
            isinstance(meta, dict) and all(k_ in meta and meta[k_] == v for k_, v in where.items())
        ):
            continue
        v = np.asarray(vec, np.float64)
        scored.append((float(v @ q / np.linalg.norm(v)), id_))
    scored.sort(reverse=True)
    return scored[:k], {i: s for s, i in scored}


def _assert_matches_reference(got, model, query, k, where=None):
    want, all_scores = _reference(model, query, k, where)
    assert len(got) == len(want)
    np.testing.assert_allclose([s for _, s, _ in got], [s for s, _ in want], atol=1e-5)
    for id_, score, meta in got:  # tie-proof: each id's own score is right
        assert score == pytest.approx(all_scores[id_], abs=1e-5)
        assert meta == model[id_][1]
    scores = [s for _, s, _ in got]
    assert scores == sorted(scores, reverse=True)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["add", "add", "add", "remove"]), st.integers(0, 24)),
        max_size=60,
    ),
    seed=st.integers(0, 2**32 - 1),
    k=st.integers(0, 30),
)
def test_search_equals_brute_force_after_adds_and_removes(store, ops, seed, k):
    ns, model = fresh_ns(store), {}
    rng = np.random.default_rng(seed)
    for op, n in ops:
        id_ = f"doc{n}"
        if op == "add":
            vec = rng.standard_normal(8).astype(np.float32)
            meta = {"n": n, "even": n % 2 == 0}
            ns.add(id_, vec, meta)
            model[id_] = (vec, meta)
        else:
            assert ns.remove(id_) is (model.pop(id_, None) is not None)
        if model and rng.random() < 0.3:  # interleaved searches: the cache must follow
            query = rng.standard_normal(8)
            _assert_matches_reference(ns.search(query, 5), model, query, 5)
    assert ns.vector_count() == len(model)
    query = rng.standard_normal(8)
    if not model:
        assert ns.search(query, k) == []
        return
    _assert_matches_reference(ns.search(query, k), model, query, k)
    _assert_matches_reference(ns.search(query, k, where={"even": True}), model, query, k,
                              {"even": True})  # fmt: skip


def test_search_with_random_data_and_interleaved_changes(store):
    ns, model = store.namespace("team"), {}
    rng = np.random.default_rng(7)
    vecs = rng.standard_normal((300, 8)).astype(np.float32)
    ns.add_many([f"v{i}" for i in range(300)], vecs, [{"g": i % 5} for i in range(300)])
    model.update({f"v{i}": (vecs[i], {"g": i % 5}) for i in range(300)})
    for step in range(40):
        query = rng.standard_normal(8)
        _assert_matches_reference(ns.search(query, 10), model, query, 10)
        victim = f"v{rng.integers(300)}"
        assert ns.remove(victim) is (model.pop(victim, None) is not None)
        new = rng.standard_normal(8).astype(np.float32)
        ns.add(f"n{step}", new, {"g": step % 5})
        model[f"n{step}"] = (new, {"g": step % 5})
    query = rng.standard_normal(8)
    _assert_matches_reference(ns.search(query, 7, where={"g": 3}), model, query, 7, {"g": 3})


def test_add_replaces_an_existing_id(ns):
    ns.add("a", [1.0, 0.0], {"v": 1})
    ns.add("b", [0.0, 1.0])
    ns.add("a", [0.0, -1.0], {"v": 2})
    assert ns.vector_count() == 2
    assert ns.search([0.0, -1.0], k=1) == [("a", pytest.approx(1.0), {"v": 2})]
    ns.add_many(["c", "c"], [[1.0, 1.0], [-1.0, 1.0]])  # the later row of an id wins
    assert ns.vector_count() == 3
    assert ns.search([-1.0, 1.0], k=1)[0][:2] == ("c", pytest.approx(1.0))


def test_remove(ns):
    ns.add_many(["a", "b", "c", "d", "e"], np.eye(5, dtype=np.float32))
    assert ns.remove("b") is True
    assert ns.remove("b") is False
    assert ns.remove("never") is False
    assert ns.vector_count() == 4
    assert sorted(r[0] for r in ns.search(np.ones(5), k=10)) == ["a", "c", "d", "e"]
    assert all(r[0] != "b" for r in ns.search([0, 1, 0, 0, 0], k=10))
    ns.add("b", [0, 1, 0, 0, 0])  # back again, in a new slot
    assert ns.search([0, 1, 0, 0, 0], k=1)[0][0] == "b"
    for id_ in "abcde":
        ns.remove(id_)
    assert ns.vector_count() == 0
    assert ns.search(np.ones(5)) == []
    assert ns.remove("a", index="nope") is False


def test_where_filters_before_ranking(ns):
    ns.add("best", [1.0, 0.0], {"kind": "note"})
    ns.add("good", [0.9, 0.1], {"kind": "paper", "tags": ["x"]})
    ns.add("fair", [0.5, 0.5], {"kind": "paper", "year": 2024})
    ns.add("bad", [-1.0, 0.0], {"kind": "paper", "year": 2023})
    ns.add("plain", [1.0, 0.01])  # no meta: never matches a filter
    q = [1.0, 0.0]
    assert [r[0] for r in ns.search(q, k=2, where={"kind": "paper"})] == ["good", "fair"]
    assert [r[0] for r in ns.search(q, k=5, where={"kind": "paper", "year": 2023})] == ["bad"]
    assert ns.search(q, where={"kind": "video"}) == []
    assert ns.search(q, where={"missing": None}) == []  # the key must be present
    assert [r[0] for r in ns.search(q, where={"tags": ["x"]})] == ["good"]  # unhashable value
    assert [r[0] for r in ns.search(q, k=1)] == ["best"]
    ns.remove("good")  # the filter follows changes
    ns.add("new", [0.8, 0.2], {"kind": "paper"})
    ns.add("fair", [0.5, 0.5], {"kind": "note"})
    assert [r[0] for r in ns.search(q, k=5, where={"kind": "paper"})] == ["new", "bad"]
    assert [r[0] for r in ns.search(q, k=5, where={"kind": "note"})] == ["best", "fair"]


def test_results_carry_private_copies_of_meta(ns):
    ns.add("a", [1.0, 0.0], {"tags": ["x"]})
    ns.search([1.0, 0.0])[0][2]["tags"].append("mutated")
    assert ns.search([1.0, 0.0])[0][2] == {"tags": ["x"]}


def test_dimension_is_fixed_per_index_and_checked(ns):
    ns.add("a", np.ones(4))
    with pytest.raises(DimensionMismatchError, match="dimension 4, not 3"):
        ns.add("b", np.ones(3))
    with pytest.raises(DimensionMismatchError, match="dimension 4, not 5"):
        ns.search(np.ones(5))
    with pytest.raises(DimensionMismatchError):
        ns.add_many(["c", "d"], np.ones((2, 5)))
    assert ns.vector_count() == 1
    ns.add("b", np.ones(3), index="small")  # another index has its own dimension
    assert ns.search(np.ones(3), index="small")[0][0] == "b"
    assert ns.drop_index() is True
    assert ns.drop_index() is False
    ns.add("a", np.ones(7))  # dropped: a new dimension is fine
    assert ns.search(np.ones(7))[0][0] == "a"


@pytest.mark.parametrize(
    ("vector", "match"),
    [
        (np.zeros(4), "zero vector"),
        ([1.0, np.nan, 0.0, 0.0], "finite"),
        (np.ones((2, 2)), "1-D"),
        ([], "1-D"),
        (["a", "b"], "numbers"),
    ],
)
def test_bad_vectors_raise(ns, vector, match):
    with pytest.raises(MemoryStoreError, match=match):
        ns.add("x", vector)
    ns.add("ok", np.ones(4))
    with pytest.raises(MemoryStoreError, match=match):
        ns.search(vector)


def test_k_bounds(ns):
    ns.add_many(["a", "b", "c"], np.eye(3))
    assert ns.search([1, 0, 0], k=0) == []
    assert len(ns.search([1, 0, 0], k=100)) == 3
    with pytest.raises(MemoryStoreError, match="k must be"):
        ns.search([1, 0, 0], k=-1)


def test_repeated_searches_reuse_the_cached_matrix(ns, store):
    rng = np.random.default_rng(1)
    ns.add_many([f"v{i}" for i in range(10)], rng.standard_normal((10, 8)))  # 5 chunks of 2
    ns.search(rng.standard_normal(8))
    before = store.statistics()
    assert before.chunks_loaded == 5
    for _ in range(5):
        ns.search(rng.standard_normal(8))
    assert store.statistics().chunks_loaded == before.chunks_loaded  # nothing re-read
    assert store.statistics().index_refreshes == before.index_refreshes
    ns.add("v10", rng.standard_normal(8))  # lands in a sixth chunk
    ns.search(rng.standard_normal(8))
    assert store.statistics().chunks_loaded == before.chunks_loaded + 1
    ns.remove("v0")  # v10 moves into slot 0: chunk 0 and chunk 5 change
    assert ns.search(rng.standard_normal(8), k=20)[0][0] != "v0"
    assert store.statistics().chunks_loaded == before.chunks_loaded + 2  # chunk 5 is gone


# ---- Processes: fork, SIGKILL, concurrent readers and writers ----


def _read_reports(fd: int, want: int, timeout_s: float = 30.0) -> list[int]:
    """Read 4-byte numbers from ``fd`` until ``want`` arrived, EOF, or ``timeout_s``."""
    buf, end = b"", time.monotonic() + timeout_s
    while len(buf) < 4 * want:
        ready, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
        if not ready:
            raise AssertionError(f"no report within {timeout_s} s ({len(buf) // 4} so far)")
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return list(struct.unpack(f"<{len(buf) // 4}I", buf[: len(buf) // 4 * 4]))


def _unit(i: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal(16).astype(np.float32)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("sync", [True, False], ids=["sync", "nosync"])
def test_every_reported_commit_survives_sigkill_of_the_writer(tmp_path, sync):
    path = tmp_path / "m"
    r, w = os.pipe()

    def writer():
        os.close(r)
        with MemoryStore(path, sync=sync, map_size=64 << 10) as s:  # the map grows, too
            ns = s.namespace("r1")
            for i in range(1_000_000):
                with ns.batch() as b:  # one transaction: a value and the counter
                    b.put(f"k{i:08d}", "x" * (i % 700))
                    b.put("counter", i)
                assert ns.append("events", i) == i
                ns.add(f"v{i}", _unit(i), {"i": i})
                os.write(w, struct.pack("<I", i))  # reported only once all three committed

    pid = fork_child(writer)
    os.close(w)
    try:
        reported = _read_reports(r, 100)  # the child keeps committing meanwhile
        os.kill(pid, signal.SIGKILL)
        reported += _read_reports(r, 1 << 30)  # what it wrote before dying (then EOF)
    finally:
        os.close(r)
        status = reap(pid)
    assert status == -signal.SIGKILL
    n = len(reported)
    assert reported == list(range(n))
    with MemoryStore(path) as s:  # opens cleanly after the kill
        ns = s.namespace("r1")
        values = dict(ns.scan("k"))
        for i in reported:
            assert values[f"k{i:08d}"] == "x" * (i % 700)
        assert len(values) in (n, n + 1)  # at most one commit not yet reported
        assert ns.get("counter") == len(values) - 1  # the batch was all or nothing
        events = ns.range("events")
        assert [seq for seq, _ in events] == [item for _, item in events]
        assert len(events) in (n, n + 1)
        assert ns.vector_count() in (n, n + 1)
        for i in reported[-5:]:
            assert ns.search(_unit(i), k=1)[0][:1] == (f"v{i}",)
        ns.put("after", "ok")  # the write lock is free again
        assert ns.append("events", "after") == len(events)


@pytest.mark.multiprocess
def test_readers_do_not_wait_for_a_writer_killed_inside_its_transaction(tmp_path):
    path = tmp_path / "m"
    with MemoryStore(path) as s:
        ns = s.namespace("r1")
        ns.put("committed", 1)
        ns.add("v", [1.0, 0.0])
        r, w = os.pipe()

        def writer():  # holds LMDB's write lock, with an uncommitted put, until killed
            os.close(r)
            release_inherited(str(path))  # py-lmdb allows one handle per path and process
            env = lmdb.open(str(path), max_dbs=4, max_readers=MAX_READERS)
            db = env.open_db(b"kv")
            txn = env.begin(write=True)
            txn.put(b"r1\0uncommitted", b"\x02", db=db)
            os.write(w, b"L")
            signal.pause()

        pid = fork_child(writer)
        os.close(w)
        try:
            assert os.read(r, 1) == b"L"
            # Readers never block on the writer: these return at once, without its put.
            assert ns.get_many(["committed", "uncommitted"]) == [1, None]
            assert ns.search([1.0, 0.0])[0][0] == "v"
        finally:
            os.kill(pid, signal.SIGKILL)
            assert reap(pid) == -signal.SIGKILL
            os.close(r)
        ns.put("next", 3)  # would hang if the dead writer's lock were kept
        assert ns.get_many(["committed", "uncommitted", "next"]) == [1, None, 3]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_readers_in_two_processes_see_consistent_snapshots(tmp_path):
    path, final = tmp_path / "m", 300
    with MemoryStore(path) as s:  # sync=True: each commit takes a while, readers overlap
        ns = s.namespace("team")
        with ns.batch() as b:
            b.put("counter", 0)
            b.put("mirror", 0)
        readers = []
        for _ in range(2):
            r, w = os.pipe()

            def reader(r=r, w=w):
                os.close(r)
                with MemoryStore(path) as mine:
                    m, last, reads = mine.namespace("team"), -1, 0
                    while last < final:
                        if reads % 2:
                            counter, mirror = m.get_many(["counter", "mirror"])
                        else:
                            snapshot = dict(m.scan())
                            counter, mirror = snapshot["counter"], snapshot["mirror"]
                        assert counter == mirror, f"torn read: {counter} != {mirror}"
                        assert counter >= last, f"went back from {last} to {counter}"
                        if counter != last:
                            os.write(w, struct.pack("<I", counter))
                            last = counter
                        reads += 1

            readers.append((fork_child(reader), r))
            os.close(w)
        try:
            for _, r in readers:
                assert _read_reports(r, 1) == [0]  # both are reading before the writes
            for i in range(1, final + 1):
                with ns.batch() as b:
                    b.put("counter", i)
                    b.put("mirror", i)
                if i % 100 == 0:  # checkpoints: each reader has seen at least this far
                    for _, r in readers:
                        seen = [0]
                        while seen[-1] < i:
                            seen = _read_reports(r, 1) or pytest.fail("reader died")
        finally:
            statuses = [reap(pid) for pid, _ in readers]
            for _, r in readers:
                os.close(r)
    assert statuses == [0, 0]  # a torn or backward read fails the reader's assert


@pytest.mark.multiprocess
def test_appenders_in_two_processes_get_unique_gap_free_numbers(tmp_path):
    path = tmp_path / "m"

    def appender(tag):
        def body():
            with MemoryStore(path, sync=False) as s:
                for i in range(150):
                    s.namespace("team").append("shared", [tag, i])

        return body

    with MemoryStore(path, sync=False):  # create it first, so the children only open it
        pass
    pids = [fork_child(appender(tag)) for tag in ("a", "b")]
    assert [reap(pid) for pid in pids] == [0, 0]
    with MemoryStore(path) as s:
        entries = s.namespace("team").range("shared")
    assert [seq for seq, _ in entries] == list(range(300))
    for tag in ("a", "b"):  # each process's items, in its own order
        assert [i for t, i in (item for _, item in entries) if t == tag] == list(range(150))


@pytest.mark.multiprocess
def test_a_search_sees_vectors_another_process_added(tmp_path, store):
    ns = store.namespace("team")
    ns.add_many([f"v{i}" for i in range(6)], [_unit(i) for i in range(6)])
    assert ns.search(_unit(100), k=10)[0][0] != "new"

    def child():
        with MemoryStore(store.path) as mine:
            m = mine.namespace("team")
            m.add("new", _unit(100))
            m.remove("v2")

    assert reap(fork_child(child)) == 0
    ids = [r[0] for r in ns.search(_unit(100), k=10)]
    assert ids[0] == "new"
    assert sorted(ids) == sorted(["new", "v0", "v1", "v3", "v4", "v5"])


@pytest.mark.multiprocess
def test_a_forked_child_must_reopen(tmp_path):
    out = tmp_path / "child.txt"
    with MemoryStore(tmp_path / "m") as s:
        ns = s.namespace("r1")
        ns.put("parent", 1)

        def child():
            try:
                ns.get("parent")
            except MemoryStoreError as exc:
                message = str(exc)
            else:
                message = "no error"
            s.reopen()
            ns.put("child", ns.get("parent") + 1)
            s.close()
            out.write_text(message)

        assert reap(fork_child(child)) == 0
        assert "forked child" in out.read_text()
        assert "reopen()" in out.read_text()
        assert ns.get("child") == 2  # the parent's handle is unharmed
        ns.put("parent", "again")
        assert ns.get("parent") == "again"
