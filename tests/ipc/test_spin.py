"""The adaptive spin policy of ring waiters (``ipc.ring._Spinner``), driven directly: its
decisions, not its timings."""

from __future__ import annotations

import time

import pytest

from ipc import ring
from ipc.ring import _Spinner


def _alive() -> None:
    """The liveness check between wait slices: the peer is alive."""


@pytest.fixture
def sem(instance):
    s = instance.create_semaphore("spin.sem", 0)
    yield s
    s.close()


def test_a_fixed_zero_spin_alive_spins(sem):
    sp = _Spinner(0.0)
    assert sp.budget == 0
    assert not sp.wait(sem, time.monotonic() + 0.001, _alive)
    for _ in range(100):
        sp._after_block(1e-6)
    assert sp.budget == 0  # fixed: no probing


def test_a_fixed_spin_keeps_its_budget(sem):
    sp = _Spinner(20.0)
    assert not sp.wait(sem, time.monotonic() + 0.001, _alive)
    assert sp.budget == pytest.approx(20e-6)


def test_adaptive_spin_shrinks_when_spinning_does_not_catch_the_peer(sem, monkeypatch):
    monkeypatch.setattr(ring.os, "cpu_count", lambda: 2)
    sp = _Spinner(None)
    assert sp.budget == pytest.approx(ring.ADAPTIVE_SPIN_MAX_US / 1e6)
    budgets = []
    while sp.budget > 0:
        assert not sp.wait(sem, time.monotonic() + 0.002, _alive)
        budgets.append(sp.budget)
    assert budgets == sorted(budgets, reverse=True)
    assert len(budgets) <= 6  # halves to zero quickly


def test_adaptive_spin_probes_after_short_waits_and_backs_off(sem, monkeypatch):
    monkeypatch.setattr(ring.os, "cpu_count", lambda: 2)
    sp = _Spinner(None)
    sp.budget = 0.0
    for _ in range(_Spinner._PROBE_AFTER - 1):
        sp._after_block(1e-6)  # short waits: a spin could have caught the peer
    assert sp.budget == 0
    sp._after_block(1e-6)
    assert sp.budget == pytest.approx(ring.ADAPTIVE_SPIN_MAX_US / 1e6)  # a probe
    assert not sp.wait(sem, time.monotonic() + 0.002, _alive)  # the probe fails
    assert sp.budget == 0
    for _ in range(2 * _Spinner._PROBE_AFTER - 1):
        sp._after_block(1e-6)
    assert sp.budget == 0  # twice as many short waits before the next probe
    sp._after_block(1e-6)
    assert sp.budget > 0


def test_long_waits_alive_trigger_a_probe(monkeypatch):
    monkeypatch.setattr(ring.os, "cpu_count", lambda: 2)
    sp = _Spinner(None)
    sp.budget = 0.0
    for _ in range(1000):
        sp._after_block(1.0)  # an idle peer
    assert sp.budget == 0


def test_a_spin_that_catches_the_peer_keeps_spinning(sem, monkeypatch):
    monkeypatch.setattr(ring.os, "cpu_count", lambda: 2)
    sp = _Spinner(None)
    before = sp.budget
    sem.release()
    assert sp.wait(sem, None, _alive)
    assert sp.budget == before


def test_one_cpu_alive_spins(monkeypatch):
    monkeypatch.setattr(ring.os, "cpu_count", lambda: 1)
    assert _Spinner(None).budget == 0


def test_a_spin_cut_short_by_its_deadline_leaves_the_budget_alone(sem, monkeypatch):
    # A zero-timeout poll of an empty ring (a worker going idle does one each time) says
    # nothing about the peer: it used to halve the budget, and turned spinning off.
    monkeypatch.setattr(ring.os, "cpu_count", lambda: 2)
    sp = _Spinner(None)
    before = sp.budget
    for _ in range(20):
        assert not sp.spin(sem, deadline=time.monotonic())
        assert not sp.wait(sem, time.monotonic() + 1e-6, _alive)
    assert sp.budget == before


def test_failed_probes_back_off_to_a_bounded_spacing(sem, monkeypatch):
    monkeypatch.setattr(ring.os, "cpu_count", lambda: 2)
    sp = _Spinner(None)
    sp.budget = 0.0
    for _ in range(12):  # a slow spell: every probe fails
        while sp.budget == 0:
            sp._after_block(1e-6)
        assert not sp.wait(sem, time.monotonic() + 0.002, _alive)
    waits = 0
    while sp.budget == 0:  # the next probe still comes within 8 << 4 short waits
        sp._after_block(1e-6)
        waits += 1
    assert waits == _Spinner._PROBE_AFTER << _Spinner._MAX_BACKOFF
