"""Policies: defaults, checks, normalization, the child's environment (sandbox/policy.py)."""

from __future__ import annotations

import dataclasses

import pytest

from sandbox import PROFILES, Policy
from sandbox.policy import DEFAULT_CPU_S, DEFAULT_MEMORY_MB, DEFAULT_WALL_S

pytestmark = pytest.mark.sandbox


def test_defaults_are_the_python_profile_with_default_limits():
    policy = Policy()
    assert policy.profile == "python"
    assert (policy.cpu_s, policy.memory_mb, policy.wall_s) == (
        DEFAULT_CPU_S,
        DEFAULT_MEMORY_MB,
        DEFAULT_WALL_S,
    )
    assert policy.workdir is None
    assert policy.read_paths == policy.write_paths == ()
    assert dict(policy.env) == {}
    assert (policy.network, policy.exec_allowed) == (False, False)


def test_profiles_grow_in_order():
    assert PROFILES == ("python", "shell", "network")
    assert [Policy(profile=p).exec_allowed for p in PROFILES] == [False, True, True]
    assert [Policy(profile=p).network for p in PROFILES] == [False, False, True]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"profile": "root"}, "unknown profile"),
        ({"cpu_s": 0}, "cpu_s must be positive"),
        ({"memory_mb": -1}, "memory_mb must be positive"),
        ({"wall_s": 0.0}, "wall_s must be positive"),
        ({"max_file_bytes": 0}, "max_file_bytes must be positive"),
        ({"max_procs": 0}, "max_procs must be positive"),
        ({"max_output_bytes": -1}, "max_output_bytes"),
        ({"workdir": "relative/dir"}, "absolute"),
        ({"read_paths": ["etc"]}, "absolute"),
        ({"env": {"A": 1}}, "str to str"),
    ],
)
def test_bad_policies_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        Policy(**changes)


def test_containers_are_normalized():
    a = Policy(read_paths=["/data"], write_paths="/out", env={"B": "2", "A": "1"})  # type: ignore[arg-type]
    b = Policy(read_paths=("/data",), write_paths=("/out",), env={"A": "1", "B": "2"})
    assert (a.read_paths, a.write_paths) == (("/data",), ("/out",))
    assert a == b
    assert hash(a) == hash(b)
    with pytest.raises(TypeError):
        a.env["C"] = "3"  # type: ignore[index]


def test_policy_is_frozen_and_replace_checks_again():
    policy = Policy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.cpu_s = 1  # type: ignore[misc]
    assert policy.replace(cpu_s=2).cpu_s == 2
    with pytest.raises(ValueError, match="cpu_s"):
        policy.replace(cpu_s=-2)


def test_environment_is_a_fixed_base_plus_env():
    env = Policy(env={"TOKEN": "for-the-tool", "LANG": "fr_FR.UTF-8"}).environment("/w")
    assert env == {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "fr_FR.UTF-8",
        "HOME": "/w",
        "TMPDIR": "/w",
        "PYTHONDONTWRITEBYTECODE": "1",
        "TOKEN": "for-the-tool",
    }
