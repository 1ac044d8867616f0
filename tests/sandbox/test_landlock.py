"""Landlock through raw syscalls: ABI detection and a ruleset in a forked child
(sandbox/landlock.py)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

from sandbox import landlock, seccomp
from tests.helpers import fork_child, reap

if TYPE_CHECKING:
    from collections.abc import Callable

pytestmark = pytest.mark.sandbox


@pytest.fixture
def abi() -> int:
    version = landlock.abi_version()
    if version == 0:
        pytest.skip("no Landlock on this kernel")
    return version


def test_abi_version_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("ASTRA_SANDBOX_LANDLOCK", "0")
    landlock.abi_version.cache_clear()
    try:
        assert landlock.abi_version() == 0
    finally:
        landlock.abi_version.cache_clear()  # the next caller sees the real kernel again


def test_rules_confine_a_child(abi, tmp_path):
    allowed, denied, writable = tmp_path / "allowed", tmp_path / "denied", tmp_path / "out"
    for d in (allowed, denied, writable):
        d.mkdir()
    (allowed / "f").write_text("yes")
    (denied / "f").write_text("no")
    rules = landlock.Rules(read=(str(allowed),), write=(str(writable),))

    def body() -> None:
        seccomp.set_no_new_privs()
        landlock.restrict(rules, abi)
        assert (allowed / "f").read_text() == "yes"
        (writable / "new").write_text("made")
        attempts: list[Callable[[], object]] = [
            lambda: (denied / "f").read_text(),
            lambda: (allowed / "x").touch(),
        ]
        for attempt in attempts:
            try:
                attempt()
            except PermissionError:
                continue
            raise AssertionError("Landlock let it through")

    assert reap(fork_child(body)) == 0
    assert (writable / "new").read_text() == "made"
    assert not (allowed / "x").exists()


def test_missing_paths_are_skipped(abi, tmp_path):
    rules = landlock.Rules(read=(str(tmp_path / "nope"), "/dev/null"))

    def body() -> None:
        seccomp.set_no_new_privs()
        landlock.restrict(rules, abi)
        with open("/dev/null", "rb") as f:
            assert f.read() == b""
        try:
            os.listdir(tmp_path)
        except PermissionError:
            return
        raise AssertionError("listing an unlisted directory was allowed")

    assert reap(fork_child(body)) == 0
