"""Running calls in sandboxed children, cold and from a warm pool (sandbox/runner.py)."""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import threading

import psutil
import pytest

from sandbox import (
    Policy,
    RemoteTraceback,
    Runner,
    SandboxCallError,
    SandboxCrashed,
    SandboxError,
    SandboxMemoryError,
    SandboxTimeout,
    SandboxViolation,
    SandboxWarning,
    WarmPool,
    landlock,
    pool as pool_module,
    runner as runner_module,
)
from tests.helpers import reap, wait_until

pytestmark = pytest.mark.sandbox

PY = Policy(wall_s=20.0)
SHELL = Policy(profile="shell", wall_s=20.0)


class CustomError(Exception):
    pass


def double(x: int, *, plus: int = 0) -> int:
    return 2 * x + plus


def talk() -> str:
    print("to stdout")
    print("to stderr", file=sys.stderr)
    os.write(1, b"raw\n")
    return "said"


def raise_value_error() -> None:
    raise ValueError("bad value", 3)


def raise_custom() -> None:
    raise CustomError("mine")


def open_missing() -> None:
    open("missing.txt")  # noqa: SIM115


def return_object() -> object:
    return object()


def exit_with(code: int) -> None:
    sys.exit(code)


def hard_exit() -> None:
    os._exit(5)


def segfault() -> None:
    ctypes.string_at(0)


def where_am_i() -> dict[str, object]:
    with open("note.txt", "w") as f:
        f.write("hello")
    return {"cwd": os.getcwd(), "files": os.listdir("."), "uid": os.getuid()}


def sleep_forever() -> None:
    signal.pause()


def hog_memory() -> None:
    b"x" * (1 << 30)


def pid_of_child() -> int:
    return os.getpid()


# ---- Cold calls ----


def test_call_returns_plain_data():
    result = Runner(PY).call(double, 20, plus=2)
    assert result.value == 42
    assert result.exit_code == 0
    assert result.pid != os.getpid()
    assert result.duration_s > 0
    assert result.cpu_s >= 0
    assert result.peak_rss_kb > 0
    assert {"session", "fds", "env", "rlimits", "seccomp"} <= result.layers


def test_layers_include_landlock_where_the_kernel_has_it():
    abi = landlock.abi_version()
    if abi == 0:
        pytest.skip("no Landlock on this kernel")
    assert f"landlock{abi}" in Runner(PY).call(int).layers


def test_closures_and_lambdas_run_cold():
    base = 40
    assert Runner(PY).call(lambda: base + 2).value == 42


def test_output_is_captured():
    result = Runner(PY).call(talk)
    assert result.value == "said"
    assert result.stdout == b"to stdout\nraw\n" or result.stdout == b"raw\nto stdout\n"
    assert result.stderr == b"to stderr\n"
    assert not result.truncated


def test_builtin_exception_is_rebuilt_with_remote_traceback():
    with pytest.raises(ValueError, match="bad value") as info:
        Runner(PY).call(raise_value_error)
    assert info.value.args == ("bad value", 3)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "raise_value_error" in str(cause)


def test_oserror_keeps_errno_and_filename():
    with pytest.raises(FileNotFoundError) as info:
        Runner(PY).call(open_missing)
    assert info.value.filename == "missing.txt"


def test_other_exception_types_become_sandbox_call_error():
    with pytest.raises(SandboxCallError) as info:
        Runner(PY).call(raise_custom)
    assert info.value.type_name.endswith("CustomError")
    assert "mine" in str(info.value)


def test_result_that_is_not_plain_data_is_an_error():
    with pytest.raises(SandboxError, match="not plain data"):
        Runner(PY).call(return_object)


def test_sys_exit():
    assert Runner(PY).call(exit_with, 0).value is None
    with pytest.raises(SandboxCrashed) as info:
        Runner(PY).call(exit_with, 3)
    assert info.value.exit_code == 3


def test_exit_without_reply_is_a_crash():
    with pytest.raises(SandboxCrashed) as info:
        Runner(PY).call(hard_exit)
    assert (info.value.exit_code, info.value.signal) == (5, None)


def test_segfault_is_a_crash_with_its_signal_and_traceback():
    with pytest.raises(SandboxCrashed) as info:
        Runner(PY).call(segfault)
    assert info.value.signal == signal.SIGSEGV
    assert info.value.signal_name == "SIGSEGV"
    assert b"Fatal Python error" in info.value.result.stderr


def test_memory_error_is_typed():
    with pytest.raises(SandboxMemoryError) as info:
        Runner(PY.replace(memory_mb=64)).call(hog_memory)
    assert info.value.limit_mb == 64


def test_reply_larger_than_the_cap_is_refused(monkeypatch):
    monkeypatch.setattr(runner_module, "MAX_REPLY_BYTES", 1000)
    with pytest.raises(SandboxError, match="reply exceeded"):
        Runner(PY).call(bytes, 10_000)


def test_errors_carry_what_was_captured():
    with pytest.raises(ValueError, match="bad value") as info:
        Runner(PY).call(raise_value_error)
    assert getattr(info.value, "result").value is None  # rebuilt built-ins carry it too  # noqa: B009
    with pytest.raises(SandboxCrashed) as crashed:
        Runner(PY).run_python("print('before'); import os; os._exit(9)")
    assert crashed.value.result.stdout == b"before\n"


# ---- The workdir and the environment ----


def test_fresh_workdir_is_private_and_removed():
    result = Runner(PY).call(where_am_i)
    workdir = result.value["cwd"]
    assert os.path.basename(workdir).startswith("astra-tool-")
    assert result.value["files"] == ["note.txt"]
    assert not os.path.exists(workdir)


def test_given_workdir_is_kept(tmp_path):
    result = Runner(PY.replace(workdir=str(tmp_path))).call(where_am_i)
    assert result.value["cwd"] == str(tmp_path)
    assert (tmp_path / "note.txt").read_text() == "hello"


def test_read_and_write_paths_are_granted(tmp_path):
    (tmp_path / "in.txt").write_text("input")
    out = tmp_path / "out"
    out.mkdir()
    policy = PY.replace(read_paths=[str(tmp_path / "in.txt")], write_paths=[str(out)])

    def copy() -> None:
        with open(tmp_path / "in.txt") as src, open(out / "copy.txt", "w") as dst:
            dst.write(src.read())

    Runner(policy).call(copy)
    assert (out / "copy.txt").read_text() == "input"


def test_environment_is_the_policy_s():
    env = Runner(PY.replace(env={"TOOL_MODE": "test"})).call(lambda: dict(os.environ)).value
    assert env["TOOL_MODE"] == "test"
    assert env["HOME"] == env["TMPDIR"]
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin"


# ---- Built-in tools ----


def test_run_python_returns_the_last_expression():
    result = Runner(PY).run_python("x = 6\nprint('hi')\nx * 7")
    assert result.value == 42
    assert result.stdout == b"hi\n"
    assert Runner(PY).run_python("y = 1").value is None


def test_run_python_errors_point_at_the_source():
    with pytest.raises(ZeroDivisionError) as info:
        Runner(PY).run_python("a = 1\nb = a / 0\n")
    assert "b = a / 0" in str(info.value.__cause__)
    with pytest.raises(SyntaxError):
        Runner(PY).run_python("def (")


def test_run_python_denials_are_violations():
    with pytest.raises(SandboxViolation) as info:
        Runner(PY).run_python("import socket\nsocket.create_connection(('127.0.0.1', 80))")
    assert info.value.syscall == "socket"
    assert info.value.nr == 41 or sys.platform != "linux"


def test_run_shell_returns_the_exit_code_and_output():
    result = Runner(SHELL).run_shell("echo out; echo err >&2; exit 3")
    assert (result.value, result.exit_code) == (3, 3)
    assert (result.stdout, result.stderr) == (b"out\n", b"err\n")


def test_run_shell_runs_programs_but_not_as_root():
    result = Runner(SHELL).run_shell("id -u; pwd; ls")
    uid, cwd, listing = result.stdout.decode().split("\n", 2)
    assert int(uid) != 0
    assert os.path.basename(cwd).startswith("astra-tool-")
    assert listing == ""


def test_python_profile_cannot_run_shell():
    with pytest.raises(ValueError, match="cannot run programs"):
        Runner(PY).run_shell("true")


# ---- The weaker mode ----


def test_without_landlock_the_runner_warns_and_still_runs(monkeypatch):
    monkeypatch.setenv("ASTRA_SANDBOX_LANDLOCK", "0")
    landlock.abi_version.cache_clear()
    try:
        with pytest.warns(SandboxWarning, match="Landlock is unavailable"):
            weak = Runner(PY)
        result = weak.call(double, 1)
    finally:
        landlock.abi_version.cache_clear()
    assert result.value == 2
    assert not any(layer.startswith("landlock") for layer in result.layers)
    assert "seccomp" in result.layers


# ---- Warm pools ----


def test_pool_serves_one_call_per_child(pool):
    pool.wait_ready()
    pids = {pool.call(pid_of_child).value for _ in range(4)}
    assert len(pids) == 4
    # The keeper forks the replacements (2 at the start, one per call) and reaps the
    # finished children; wait_ready() waits for both.
    pool.wait_ready()
    stats = pool.statistics()
    assert (stats.size, stats.calls, stats.spawned, stats.idle) == (2, 4, 6, 2)
    assert not pool._exiting


def test_pool_defers_a_replacement_while_another_child_is_ready(pool):
    pool.wait_ready()
    first, first_deferred = pool._take()  # one child left ready: fork after this call
    second, second_deferred = pool._take()  # none left: fork now
    assert (first_deferred, second_deferred) == (True, False)
    wait_until(lambda: pool.statistics().idle == 1, timeout_s=10)
    assert pool.statistics().spawned == 3  # only the replacement of the second
    pool._give_up(first, first_deferred)  # the first "call" is over: now its replacement
    pool._give_up(second, second_deferred)
    pool.wait_ready()
    assert (pool.statistics().idle, pool.statistics().spawned) == (2, 4)


def test_pool_retries_a_call_whose_child_died_after_it_was_taken(pool, monkeypatch):
    pool.wait_ready()
    victim = pool._idle[0]
    os.kill(victim.pid, signal.SIGKILL)
    wait_until(lambda: select.select([victim.pidfd], [], [], 0)[0])
    # As if it died between _take's check and the write: the write breaks the pipe.
    monkeypatch.setattr(pool_module, "_has_exited", lambda child: False)
    assert pool.call(pid_of_child).value != victim.pid


def test_pool_ships_closures_with_cloudpickle(pool):
    factor = 3
    assert pool.call(lambda x: factor * x, 14).value == 42
    assert pool.run_python("sum(range(10))").value == 45


def test_pool_call_keeps_the_parent_side_typed_errors(pool):
    with pytest.raises(SandboxViolation):
        pool.run_python("import os; os.fork()")
    with pytest.raises(ValueError, match="bad value"):
        pool.call(raise_value_error)
    assert pool.call(double, 2).value == 4


@pytest.mark.slow
def test_pool_carries_on_after_timeout_crash_and_memory_error():
    with WarmPool(Policy(wall_s=0.5, memory_mb=64), size=1) as pool:
        with pytest.raises(SandboxTimeout):
            pool.call(sleep_forever)
        with pytest.raises(SandboxCrashed):
            pool.call(segfault)
        with pytest.raises(SandboxMemoryError):
            pool.call(hog_memory)
        assert pool.call(double, 21).value == 42


def test_pool_replaces_a_child_killed_while_idle(pool):
    pool.wait_ready()
    child = pool._idle[0]
    victim = child.pid
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: select.select([child.pidfd], [], [], 0)[0])  # dead, not yet reaped
    assert pool.call(pid_of_child).value != victim


def test_pool_shell_profile():
    with WarmPool(SHELL, size=1) as pool:
        assert pool.run_shell("echo warm").stdout == b"warm\n"


def test_pool_serves_threads(pool):
    results: list[int] = []

    def worker(n: int) -> None:
        results.extend(pool.call(double, n * 10 + i).value for i in range(3))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [0, 2, 4, 20, 22, 24]


def test_closed_pool_refuses_calls():
    pool = WarmPool(PY, size=1)
    pool.close()
    pool.close()  # idempotent
    assert pool.statistics().idle == 0
    with pytest.raises(RuntimeError, match="closed"):
        pool.call(int)


def test_pool_size_must_be_positive():
    with pytest.raises(ValueError, match="at least one"):
        WarmPool(PY, size=0)


# ---- The lifeline ----


def _orphan_a_busy_pool(w: int) -> None:
    """In a forked child: start a call in a warm child, report its pid, die at once."""
    pool = WarmPool(Policy(wall_s=60.0), size=1)
    pool.wait_ready()
    pid = pool._idle[0].pid
    threading.Thread(target=pool.call, args=(sleep_forever,), daemon=True).start()
    wait_until(lambda: not pool._idle or pool._idle[0].pid != pid)  # dispatched
    os.write(w, str(pid).encode())
    os._exit(0)  # no close(): the kernel must clean up


def test_sandboxes_die_with_their_parent_process():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            _orphan_a_busy_pool(w)
        finally:
            os._exit(1)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        sandbox_pid = int(f.read())
    assert reap(pid) == 0

    def gone() -> bool:
        try:
            return bool(psutil.Process(sandbox_pid).status() == psutil.STATUS_ZOMBIE)
        except psutil.NoSuchProcess:
            return True

    wait_until(gone, timeout_s=10)
    # Its fresh workdirs stayed behind; the next Runner or WarmPool removes them.
    stale = runner_module.cleanup_stale_workdirs()
    assert any(f"astra-tool-{pid}-" in path for path in stale)


# ---- A child that cannot lock down ----


def test_a_failed_lockdown_is_reported():
    policy = PY.replace(workdir="/nonexistent/astra-workdir")
    with pytest.raises(SandboxError, match="could not set up the sandbox") as info:
        Runner(policy).call(int)
    assert "FileNotFoundError" in str(info.value)
    with WarmPool(policy, size=1) as pool, pytest.raises(SandboxError, match="could not set up"):
        pool.wait_ready()
