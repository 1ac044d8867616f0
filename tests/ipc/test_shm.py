"""Segments, instances, owner records and stale cleanup (ipc/shm.py)."""

from __future__ import annotations

import os
import signal
import stat

import pytest

from ipc.errors import SegmentError
from ipc.shm import (
    SHM_DIR,
    Instance,
    OFDLock,
    Segment,
    cleanup_stale,
    instance_objects,
    is_alive,
    process_start_time,
)
from tests.helpers import fork_child, reap


def _entries(inst: Instance) -> list[str]:
    return instance_objects(inst.id).get(inst.id, [])


def test_segments_are_private_and_named_per_instance(instance):
    seg = instance.create_segment("probe", 4096)
    sem = instance.create_semaphore("probe.sem", 0)
    try:
        assert seg.name == f"/astra-{instance.id}-probe"
        for entry in (f"astra-{instance.id}-probe", f"sem.astra-{instance.id}-probe.sem"):
            mode = stat.S_IMODE(os.stat(os.path.join(SHM_DIR, entry)).st_mode)
            assert mode == 0o600, (entry, oct(mode))
        assert instance.id.startswith(f"{os.getpid()}")
    finally:
        sem.close()
        seg.close()


def test_close_removes_every_object_including_other_processes(instance):
    instance.create_segment("mine", 4096).close()

    def child():
        Instance.attach(instance.id).create_segment("theirs", 4096).close()

    assert reap(fork_child(child)) == 0
    assert len(_entries(instance)) == 3  # owner record, mine, theirs
    instance.close()
    assert _entries(instance) == []


def test_a_fork_child_closing_the_inherited_instance_removes_nothing(instance):
    instance.create_segment("kept", 4096).close()
    before = sorted(_entries(instance))
    assert reap(fork_child(instance.close)) == 0
    assert sorted(_entries(instance)) == before


def test_open_missing_segment_is_a_segment_error(instance):
    with pytest.raises(SegmentError):
        instance.open_segment("nope")
    with pytest.raises(SegmentError):
        Instance.attach("999999999")


def test_open_without_permission_raises_permission_error(instance):
    seg = instance.create_segment("locked", 4096)
    seg.close()
    os.chmod(os.path.join(SHM_DIR, seg.name.lstrip("/")), 0o000)

    def child():
        os.setresuid(65534, 65534, 65534)  # nobody: not the owner
        try:
            Segment.open(seg.name)
        except PermissionError:
            os._exit(0)
        os._exit(3)

    if os.getuid() != 0:
        pytest.skip("needs root to switch to another uid")
    assert reap(fork_child(child)) == 0


def test_process_identity():
    me = process_start_time(os.getpid())
    assert me is not None
    assert is_alive(os.getpid(), me)
    assert not is_alive(os.getpid(), me + 1)  # same pid, other start: a reused pid
    assert process_start_time(2**22 + 12345) is None


def test_zombie_counts_as_dead():
    pid = fork_child(lambda: None)
    # Wait until it has exited, without reaping it.
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    assert process_start_time(pid) is None
    assert reap(pid) == 0


@pytest.mark.multiprocess
def test_cleanup_removes_instances_of_a_killed_owner():
    r, w = os.pipe()

    def child():
        os.close(r)
        inst = Instance.create()
        inst.create_segment("ring", 65536).close()
        inst.create_semaphore("ring.i0", 0).close()
        os.write(w, inst.id.encode())
        signal.pause()

    pid = fork_child(child)
    os.close(w)
    inst_id = os.read(r, 100).decode()
    os.close(r)
    assert len(instance_objects(inst_id)[inst_id]) == 3
    assert not any(inst_id in entry for entry in cleanup_stale())  # owner alive: kept
    assert inst_id in instance_objects()
    os.kill(pid, signal.SIGKILL)
    assert reap(pid) == -signal.SIGKILL
    removed = cleanup_stale()
    assert sorted(removed) == sorted(
        [f"astra-{inst_id}-owner", f"astra-{inst_id}-ring", f"sem.astra-{inst_id}-ring.i0"]
    )
    assert inst_id not in instance_objects()


def test_cleanup_keeps_live_instances_and_respects_labels(instance):
    instance.create_segment("keep", 4096).close()
    assert not any(instance.id in e for e in cleanup_stale())
    assert len(_entries(instance)) == 2


def test_ofd_lock_excludes_other_processes_and_dies_with_its_holder(instance):
    seg = instance.create_segment("lockfile", 4096)
    lock = OFDLock(seg.path)
    r, w = os.pipe()

    def holder():
        os.close(r)
        lock.acquire()
        os.write(w, b"x")
        signal.pause()  # killed while holding the lock

    pid = fork_child(holder)
    os.close(w)
    assert os.read(r, 1) == b"x"
    os.close(r)
    assert not lock.try_acquire()  # the child holds it
    os.kill(pid, signal.SIGKILL)
    reap(pid)
    assert lock.try_acquire()  # the kernel released the dead holder's lock
    lock.release()
    lock.close()
    seg.close()
