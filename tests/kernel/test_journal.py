"""The LMDB journal (kernel/journal.py): tables, batches, map growth, SIGKILL and fork."""

from __future__ import annotations

import os
import signal
import stat
import struct

import lmdb
import pytest

from kernel.journal import Journal, JournalError, JournalFullError
from tests.helpers import fork_child, reap


@pytest.fixture
def journal(tmp_path):
    with Journal.open(tmp_path / "j", map_size=1 << 20) as j:
        yield j


# ---- Tables ----


def test_crud(journal):
    t = journal.table("states")
    assert t.get(b"a") is None
    t.put(b"a", b"1")
    t.put(b"b", b"")  # empty values are fine
    assert t.get(b"a") == b"1"
    assert t.get(b"b") == b""
    t.put(b"a", b"2")
    assert t.get(b"a") == b"2"
    assert t.count() == 2
    assert t.delete(b"a") is True
    assert t.delete(b"a") is False
    assert t.get(b"a") is None
    assert t.count() == 1


def test_tables_are_separate_and_cached(journal):
    a, b = journal.table("a"), journal.table("b")
    assert journal.table("a") is a
    a.put(b"k", b"from a")
    b.put(b"k", b"from b")
    assert (a.get(b"k"), b.get(b"k")) == (b"from a", b"from b")
    assert journal.tables() == ["a", "b"]


def test_scan_by_prefix_is_a_sorted_snapshot(journal):
    t = journal.table("t")
    for key in (b"agent/2", b"agent/1", b"agent/10", b"agenda", b"b", b"agent0"):
        t.put(key, key.upper())
    it = t.scan(b"agent/")
    t.put(b"agent/3", b"late")  # after the scan began: not in its snapshot
    assert list(it) == [
        (b"agent/1", b"AGENT/1"),
        (b"agent/10", b"AGENT/10"),
        (b"agent/2", b"AGENT/2"),
    ]
    assert [k for k, _ in t.scan(b"agent/")] == [b"agent/1", b"agent/10", b"agent/2", b"agent/3"]
    assert [k for k, _ in t.scan()] == sorted(k for k, _ in t.scan())
    assert len(list(t.scan())) == 7
    assert list(t.scan(b"zzz")) == []


def test_bad_keys_and_names_raise_journal_error(journal):
    t = journal.table("t")
    with pytest.raises(JournalError, match="1 to 511 bytes"):
        t.put(b"", b"x")
    with pytest.raises(JournalError, match="1 to 511 bytes"):
        t.get(b"k" * 512)
    with pytest.raises(JournalError, match="are bytes"):
        t.put("text", b"x")
    with pytest.raises(JournalError, match="are bytes"):
        t.put(b"k", "text")
    with pytest.raises(JournalError, match="bad table name"):
        journal.table("")
    with pytest.raises(JournalError, match="bad table name"):
        journal.table("a\0b")


def test_too_many_tables(tmp_path):
    with Journal.open(tmp_path / "j", max_dbs=2) as j:
        j.table("a")
        j.table("b")
        with pytest.raises(JournalError, match="max_dbs=2"):
            j.table("c")


def test_files_are_private(tmp_path):
    path = tmp_path / "state" / "journal"
    with Journal.open(path):
        pass
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    for name in ("data.mdb", "lock.mdb"):
        assert stat.S_IMODE(os.stat(path / name).st_mode) == 0o600


def test_close_is_idempotent_and_final(tmp_path):
    j = Journal.open(tmp_path / "j")
    t = j.table("t")
    t.put(b"k", b"v")
    j.close()
    j.close()
    assert j.closed
    with pytest.raises(JournalError, match="closed"):
        t.get(b"k")
    with Journal.open(tmp_path / "j") as again:  # the data outlives the handle
        assert again.table("t").get(b"k") == b"v"


def test_reopen_keeps_table_handles(journal):
    t = journal.table("t")
    t.put(b"k", b"v")
    journal.reopen()
    assert t.get(b"k") == b"v"


# ---- Batches ----


def test_batch_commits_across_tables_at_once(journal):
    a, b = journal.table("a"), journal.table("b")
    b.put(b"gone", b"x")
    with journal.batch() as batch:
        batch.put(a, b"1", b"one")
        batch.put("b", b"2", b"two")  # by name
        batch.delete(b, b"gone")
        batch.delete(b, b"never-there")
        assert len(batch) == 4
        assert a.get(b"1") is None  # nothing applied before the block exits
    assert a.get(b"1") == b"one"
    assert b.get(b"2") == b"two"
    assert b.get(b"gone") is None


def test_an_exception_in_a_batch_applies_nothing(journal):
    a = journal.table("a")
    a.put(b"keep", b"old")
    batch = journal.batch()

    def failing_block():
        with batch:
            batch.put(a, b"new", b"x")
            batch.put(a, b"keep", b"overwritten")
            raise RuntimeError("abort")

    with pytest.raises(RuntimeError):
        failing_block()
    assert a.get(b"new") is None
    assert a.get(b"keep") == b"old"
    with pytest.raises(JournalError, match="already been committed"):
        batch.put(a, b"late", b"x")


def test_a_failing_operation_aborts_the_whole_batch(journal):
    a = journal.table("a")
    batch = journal.batch()
    batch.put(a, b"fine", b"x")
    batch.put(a, b"", b"bad key")
    with pytest.raises(JournalError):
        batch.commit()
    assert a.get(b"fine") is None


def test_a_table_of_another_journal_is_refused(journal, tmp_path):
    with Journal.open(tmp_path / "other") as other:
        foreign = other.table("t")
        with pytest.raises(JournalError, match="another journal"):
            journal.batch().put(foreign, b"k", b"v")


# ---- Map growth ----


def test_the_map_grows_when_full(tmp_path):
    with Journal.open(tmp_path / "j", map_size=64 << 10, max_map_size=64 << 20) as j:
        t = j.table("t")
        value = os.urandom(4000)
        for i in range(200):  # ~800 KB through a 64 KiB map
            t.put(b"%04d" % i, value)
        with j.batch() as batch:  # a single transaction bigger than the map, too
            for i in range(200, 400):
                batch.put(t, b"%04d" % i, value)
        assert t.count() == 400
        assert t.get(b"0399") == value
        assert j.statistics().map_size >= 2 << 20


def test_past_the_cap_a_write_raises_journal_full_and_applies_nothing(tmp_path):
    with Journal.open(tmp_path / "j", map_size=64 << 10, max_map_size=256 << 10) as j:
        t = j.table("t")
        t.put(b"before", b"x")
        batch = j.batch()
        for i in range(200):
            batch.put(t, b"%04d" % i, bytes(4000))
        with pytest.raises(JournalFullError, match="max_map_size"):
            batch.commit()
        assert j.statistics().map_size == 256 << 10
        assert t.count() == 1  # nothing of the failed batch
        assert t.get(b"before") == b"x"
        t.put(b"small", b"still fits")
        assert t.get(b"small") == b"still fits"
        assert issubclass(JournalFullError, JournalError)


def test_reopening_with_a_map_smaller_than_the_data_works(tmp_path):
    value = os.urandom(4000)
    with Journal.open(tmp_path / "j", map_size=4 << 20) as j:
        for i in range(300):
            j.table("t").put(b"%04d" % i, value)
    with Journal.open(tmp_path / "j", map_size=64 << 10) as j:  # LMDB raises it to fit
        stats = j.statistics()
        assert stats.map_size >= stats.used_bytes > 1 << 20
        assert j.table("t").count() == 300
        j.table("t").put(b"more", value)  # and it grows from there


# ---- SIGKILL and fork ----


def _read_commits(fd: int, want: int) -> list[int]:
    """Read 4-byte commit numbers from ``fd`` until ``want`` arrived (or EOF)."""
    buf = b""
    while len(buf) < 4 * want:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return list(struct.unpack(f"<{len(buf) // 4}I", buf[: len(buf) // 4 * 4]))


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("sync", [True, False])
def test_every_reported_commit_survives_sigkill_of_the_writer(tmp_path, sync):
    path = tmp_path / "j"
    r, w = os.pipe()

    def writer():
        os.close(r)
        with Journal.open(path, map_size=64 << 10, sync=sync) as j:
            a, b = j.table("a"), j.table("b")
            for i in range(1_000_000):
                with j.batch() as batch:  # one transaction over two tables
                    batch.put(a, b"%08d" % i, b"A" * (i % 700))
                    batch.put(b, b"%08d" % i, b"B" * (i % 700))
                os.write(w, struct.pack("<I", i))  # reported only once committed

    pid = fork_child(writer)
    os.close(w)
    try:
        reported = _read_commits(r, 300)  # the child keeps committing meanwhile
        os.kill(pid, signal.SIGKILL)
        reported += _read_commits(r, 1 << 30)  # what it wrote before dying (then EOF)
    finally:
        os.close(r)
        status = reap(pid)
    assert status == -signal.SIGKILL
    assert reported == list(range(len(reported)))
    with Journal.open(path) as j:
        a, b = dict(j.table("a").scan()), dict(j.table("b").scan())
        for i in reported:
            assert a[b"%08d" % i] == b"A" * (i % 700)
        assert a.keys() == b.keys()  # every transaction is all or nothing
        assert len(a) in (len(reported), len(reported) + 1)  # at most one unreported
        j.table("a").put(b"after", b"ok")  # the write lock is free again


@pytest.mark.multiprocess
@pytest.mark.parametrize("open_first", [True, False], ids=["open-before-kill", "open-after"])
def test_a_writer_killed_inside_a_transaction_leaves_a_usable_journal(tmp_path, open_first):
    """open-before-kill: this process shares the lock file with the dead writer, so the next
    write goes through the robust mutex's owner-dead recovery. open-after: this process is
    the only user, and LMDB resets the lock file on open."""
    path = tmp_path / "j"
    with Journal.open(path) as j:
        j.table("t").put(b"committed", b"1")
    r, w = os.pipe()

    def writer():
        os.close(r)
        env = lmdb.open(str(path), max_dbs=64, max_readers=1024)
        db = env.open_db(b"t")
        txn = env.begin(write=True)
        txn.put(b"uncommitted", b"2", db=db)
        os.write(w, b"L")
        signal.pause()  # SIGKILLed here, holding the write lock

    pid = fork_child(writer)
    os.close(w)
    j = None
    try:
        assert os.read(r, 1) == b"L"
        if open_first:
            j = Journal.open(path)
    finally:
        os.kill(pid, signal.SIGKILL)
        assert reap(pid) == -signal.SIGKILL
        os.close(r)
    with j or Journal.open(path) as journal:
        t = journal.table("t")
        t.put(b"next", b"3")  # would hang forever if the dead writer's lock were kept
        assert t.get(b"uncommitted") is None
        assert t.get(b"committed") == b"1"
        assert t.get(b"next") == b"3"


@pytest.mark.multiprocess
def test_a_forked_child_must_reopen(tmp_path):
    path = tmp_path / "j"
    out = tmp_path / "child.txt"
    with Journal.open(path) as j:
        t = j.table("t")
        t.put(b"parent", b"1")

        def child():
            try:
                t.get(b"parent")
            except JournalError as exc:
                message = str(exc)
            else:
                message = "no error"
            j.reopen()
            t.put(b"child", t.get(b"parent") + b"2")
            j.close()
            out.write_text(message)

        assert reap(fork_child(child)) == 0
        assert "forked child" in out.read_text()
        assert "reopen()" in out.read_text()
        assert t.get(b"child") == b"12"  # the parent's handle is unharmed
        t.put(b"parent", b"again")
        assert t.get(b"parent") == b"again"


@pytest.mark.multiprocess
def test_a_forked_child_may_open_the_same_path(tmp_path):
    path = tmp_path / "j"
    with Journal.open(path) as j:
        t = j.table("t")
        t.put(b"k", b"v")

        def child():
            with Journal.open(path) as mine:  # the inherited handle no longer blocks this
                mine.table("t").put(b"k2", mine.table("t").get(b"k"))

        assert reap(fork_child(child)) == 0
        assert t.get(b"k2") == b"v"
