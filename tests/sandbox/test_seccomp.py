"""The seccomp profiles: compiling, the placeholder pid, argument complements, naming
denials (sandbox/seccomp.py). What the filters deny in a live child is test_escapes.py."""

from __future__ import annotations

import itertools
import platform
import struct

import pytest

from sandbox import seccomp
from sandbox.seccomp import _SELF_PID, VIOLATION_ERRNO_BASE, _complement

pytestmark = pytest.mark.sandbox

PROFILES = [("python", False), ("shell", False), ("shell", True), ("network", True)]


@pytest.mark.parametrize(("profile", "scoped"), PROFILES)
def test_profiles_compile_to_loadable_programs(profile, scoped):
    compiled = seccomp.compile_filter(profile, signals_scoped=scoped)
    assert compiled.profile == profile
    assert 0 < compiled.instructions < 4096  # BPF_MAXINSNS
    assert compiled is seccomp.compile_filter(profile, signals_scoped=scoped)  # cached


@pytest.mark.skipif(platform.machine() != "x86_64", reason="checks the x86-64 prologue")
def test_foreign_abis_kill_the_process():
    insns = list(struct.iter_unpack("=HBBI", seccomp.compile_filter("python").bpf))
    ret_kill_process = (0x06, 0x8000_0000)
    assert (0x15, 0xC000_003E) in [(code, k) for code, _, _, k in insns[:3]]  # AUDIT_ARCH
    assert (0x35, 0x4000_0000) in [(code, k) for code, _, _, k in insns[:5]]  # x32 bit
    assert ret_kill_process in [(code, k) for code, _, _, k in insns[:8]]


def test_self_pid_is_patched_into_every_slot():
    compiled = seccomp.compile_filter("python")
    assert len(compiled.self_slots) == 3  # tgkill, rt_sigqueueinfo, rt_tgsigqueueinfo
    patched = compiled.for_pid(4242)
    insns = list(struct.iter_unpack("=HBBI", patched))
    assert all(insns[i][3] == 4242 for i in compiled.self_slots)
    assert _SELF_PID not in [k for *_, k in insns]
    assert len(patched) == len(compiled.bpf)


def test_scoped_shell_profile_needs_no_pid():
    assert seccomp.compile_filter("shell", signals_scoped=True).self_slots == ()


@pytest.mark.parametrize(
    "values", [(1,), (0,), (2, 10), (0x5401, 0x540F, 0x5413, 0x5450), (1, 2, 3, 500)]
)
def test_complement_matches_exactly_the_other_values(values):
    rules = _complement(values)
    ops = {
        "EQ": lambda a, b: a == b,
        "NE": lambda a, b: a != b,
        "LT": lambda a, b: a < b,
        "GT": lambda a, b: a > b,
    }
    probes = itertools.chain(range(600), range(0x5300, 0x5500), [2**32 + 1, 2**64 - 1])
    for v in probes:
        denied = any(ops[op](v, k) for op, k in rules)
        long_gap = not denied and v not in values and min(values) < v < max(values)
        assert denied == (v not in values) or long_gap, (values, v)


def test_unknown_syscall_names_are_refused(monkeypatch):
    rules = seccomp._profile_rules
    monkeypatch.setattr(
        seccomp, "_profile_rules", lambda p, **kw: {**rules(p, **kw), "no_such_call": None}
    )
    with pytest.raises(ValueError, match="no_such_call"):
        seccomp.compile_filter.__wrapped__("python")


def test_violation_errnos_name_their_syscall():
    assert seccomp.violation_syscall(VIOLATION_ERRNO_BASE + 41) == ("socket", 41)
    assert seccomp.violation_syscall(13) is None
    assert seccomp.violation_syscall(None) is None
    assert seccomp.violation_syscall(VIOLATION_ERRNO_BASE + seccomp.MAX_SYSCALL_NR) is None
    assert seccomp.syscall_name(1 << 20) == f"syscall_{1 << 20}"
    if platform.machine() == "x86_64":
        assert seccomp.syscall_name(462) == "mseal"  # newer than libseccomp's table
