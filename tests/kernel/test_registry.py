"""The shared agent registry (kernel/registry.py)."""

from __future__ import annotations

import os

import pytest

from ipc import Instance
from kernel.registry import Registry, RegistryFullError
from tests.helpers import fork_child, reap


@pytest.fixture
def registry():
    inst = Instance.create()
    reg = Registry.create(inst, 100)
    try:
        yield inst, reg
    finally:
        reg.close()
        inst.close()


def test_a_name_is_unique_until_released(registry):
    _, reg = registry
    assert reg.claim("r1", 0)
    assert not reg.claim("r1", 1)
    assert reg.lookup("r1") == 0
    assert reg.move("r1", 1)
    assert reg.lookup("r1") == 1
    assert reg.release("r1", worker=0) is False  # not on worker 0 any more
    assert reg.release("r1")
    assert reg.lookup("r1") == -1
    assert reg.claim("r1", 2)


def test_release_worker_frees_its_names_only(registry):
    _, reg = registry
    for i in range(30):
        assert reg.claim(f"a{i}", i % 3)
    freed = reg.release_worker(1)
    assert sorted(freed) == sorted(f"a{i}" for i in range(30) if i % 3 == 1)
    assert reg.used == 20
    assert {n for n, _ in reg.entries()} == {f"a{i}" for i in range(30) if i % 3 != 1}


def test_full_and_bad_names(registry):
    _, reg = registry
    for i in range(100):
        assert reg.claim(f"n{i}", 0)
    with pytest.raises(RegistryFullError):
        reg.claim("one-too-many", 0)
    with pytest.raises(ValueError, match="UTF-8 bytes"):
        reg.lookup("")
    with pytest.raises(ValueError, match="UTF-8 bytes"):
        reg.claim("x" * 81, 0)


def test_another_process_sees_claims(registry):
    inst, reg = registry
    reg.claim("shared", 3)

    def child():
        other = Registry.open(Instance.attach(inst.id))
        os._exit(0 if other.lookup("shared") == 3 and not other.claim("shared", 1) else 1)

    assert reap(fork_child(child)) == 0
