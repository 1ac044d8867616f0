"""The plugin API in one process (kernel/plugins.py): discovery by spec, class and entry
point; setup and listener failures disabled and reported; event flags; services; a plugin's
own LMDB table; supervisor services over a link served by a thread; the router a plugin
registers (one per process, a default one giving way). The same API with
real kernels and astrad is in tests/astra/test_plugins.py.
"""

from __future__ import annotations

import importlib
import select
import socket
import sys
import textwrap
import threading
from typing import TYPE_CHECKING, cast

import pytest

from kernel import plugins
from kernel.plugins import (
    EVENTS,
    Candidate,
    DefaultRouter,
    Plugin,
    PluginContext,
    PluginError,
    PluginHost,
    ServiceNotFoundError,
    SupervisorLink,
    discover,
    events,
    read_plugins,
)
from kernel.topics import TopicTable

if TYPE_CHECKING:
    import pathlib
    from collections.abc import Callable, Iterator


def install_dist(
    root: pathlib.Path, dist: str, modules: dict[str, str], entry_points: dict[str, str]
) -> pathlib.Path:
    """A minimal installed distribution in ``root`` (a directory to put on sys.path or
    PYTHONPATH): its modules, and a dist-info whose ``entry_points.txt`` lists
    ``entry_points`` in the ``astra.plugins`` group. Returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[astra.plugins]\n{lines}")
    return root


# ---- Plugins used below ----


class Echo(Plugin):
    name = "echo"

    def setup(self, ctx: PluginContext) -> None:
        self.ctx = ctx
        self.seen: list[tuple[str, int]] = []
        ctx.service("twice", lambda x: 2 * x)
        ctx.service("whoami", lambda: (ctx.role, ctx.worker))
        ctx.on("task_started", lambda e: self.seen.append((e.kind, e.task)))
        ctx.on("task_finished", lambda e: self.seen.append((e.kind, e.task)))


class SetupFails(Plugin):
    name = "setup_fails"

    def setup(self, ctx: PluginContext) -> None:
        ctx.service("half_registered", lambda: None)
        raise RuntimeError("no config here")


class HookFails(Plugin):
    name = "hook_fails"
    closed = 0

    def setup(self, ctx: PluginContext) -> None:
        ctx.service("ping", lambda: "pong")
        ctx.on("task_started", self.boom)

    def boom(self, event: plugins.Event) -> None:
        raise ValueError(f"cannot handle task {event.task}")

    def close(self) -> None:
        type(self).closed += 1


class NotAPlugin:
    pass


@pytest.fixture
def host_factory(tmp_path) -> Iterator[list[PluginHost]]:
    """Hosts built by a test, closed and deactivated after it."""
    hosts: list[PluginHost] = []
    yield hosts
    plugins.activate(None)
    for host in hosts:
        host.close()


def _load(hosts: list[PluginHost], data_dir: pathlib.Path, *classes: object) -> PluginHost:
    cands = discover(entry_points=False, requested=[(c, "test") for c in classes])
    host = PluginHost.load(cands, str(data_dir))
    hosts.append(host)
    return host


# ---- Discovery ----


def test_discover_by_spec_and_class_reports_what_cannot_load():
    found = discover(
        ["kernel.plugins:Plugin"],
        [
            (f"{__name__}:Echo", "flag --plugin"),
            (Echo, "Kernel(plugins=...)"),  # the same class again: counted once
            ("no_such_module_xyz:Thing", "config"),
            (f"{__name__}:NotAPlugin", "config"),
            ("missing-colon", "config"),
            (f"{__name__}:Nope", "config"),
        ],
        entry_points=False,
    )
    assert [(c.source, c.cls is not None) for c in found] == [
        ("builtin", False),  # the base class itself is no plugin
        ("flag --plugin", True),
        ("config", False),
        ("config", False),
        ("config", False),
        ("config", False),
    ]
    assert found[1].name == "echo"
    assert found[1].spec == f"{__name__}:Echo"
    assert "ModuleNotFoundError" in found[2].error
    assert "not a Plugin subclass" in found[3].error
    assert "package.module:Class" in found[4].error
    assert "AttributeError" in found[5].error


def test_a_second_plugin_of_a_taken_name_is_refused():
    class Other(Plugin):
        name = "echo"

    found = discover(requested=[(Echo, "a"), (Other, "b")], entry_points=False)
    assert found[0].cls is Echo
    assert found[1].cls is None
    assert "taken" in found[1].error


def test_discover_by_entry_point(tmp_path, monkeypatch):
    root = install_dist(
        tmp_path / "site",
        "astra_fake_dist",
        {
            "astra_fake_plugin": """
                from kernel.plugins import Plugin
                class Fake(Plugin):
                    name = "fake"
                    def setup(self, ctx):
                        ctx.service("hello", lambda who: f"hello {who}")
                """,
            "astra_broken_plugin": "raise ImportError('broken on purpose')\n",
        },
        {"fake": "astra_fake_plugin:Fake", "broken": "astra_broken_plugin:Nothing"},
    )
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    try:
        found = {c.name: c for c in discover()}
        assert found["fake"].cls is not None
        assert found["fake"].source == "entry point fake (astra_fake_dist)"
        assert found["broken"].cls is None
        assert "broken on purpose" in found["broken"].error
    finally:
        for module in ("astra_fake_plugin", "astra_broken_plugin"):
            sys.modules.pop(module, None)


# ---- Load, status and failure ----


def test_setup_failure_disables_the_plugin_and_leaves_nothing_registered(tmp_path, host_factory):
    host = _load(host_factory, tmp_path, Echo, SetupFails, "no_such_module_xyz:P")
    assert host.names() == ["echo"]
    with pytest.raises(ServiceNotFoundError, match=r"disabled.*no config here"):
        host.call("setup_fails.half_registered", (), {})
    assert host.call("echo.twice", (21,), {}) == 42
    host.close()
    rows = {r.name: r for r in read_plugins(str(tmp_path))}
    assert rows["echo"].state == "enabled"
    assert rows["echo"].services == ("echo.twice", "echo.whoami")
    assert rows["echo"].events == ("task_started", "task_finished")
    assert rows["setup_fails"].state == "disabled"
    assert rows["setup_fails"].error == "RuntimeError: no config here"
    assert rows["setup_fails"].failures == ("supervisor: setup: RuntimeError: no config here",)
    assert rows["no_such_module_xyz:P"].state == "disabled"
    assert "ModuleNotFoundError" in rows["no_such_module_xyz:P"].error


def test_a_new_run_forgets_the_last_runs_status(tmp_path, host_factory):
    _load(host_factory, tmp_path, SetupFails).close()
    _load(host_factory, tmp_path, Echo).close()
    assert [(r.name, r.failures) for r in read_plugins(str(tmp_path))] == [("echo", ())]


def test_events_are_off_until_someone_listens_and_seen_in_order(tmp_path, host_factory):
    assert not any(getattr(events, kind) for kind in EVENTS)
    host = _load(host_factory, tmp_path, Echo)
    assert not events.task_started  # not this process's host yet
    plugins.activate(host)
    assert events.task_started
    assert events.task_finished
    assert not events.agent_spawned
    for task in (1, 2):
        plugins.emit("task_started", task=task)
        plugins.emit("task_finished", task=task)
    echo = host.plugin("echo")
    assert isinstance(echo, Echo)
    assert echo.seen == [
        ("task_started", 1),
        ("task_finished", 1),
        ("task_started", 2),
        ("task_finished", 2),
    ]
    plugins.activate(None)
    assert not events.task_started


def test_a_listener_that_raises_disables_only_its_plugin(tmp_path, host_factory):
    HookFails.closed = 0
    host = _load(host_factory, tmp_path, HookFails, Echo)
    plugins.activate(host)
    assert host.call("hook_fails.ping", (), {}) == "pong"
    plugins.emit("task_started", task=7)  # HookFails raises; Echo still sees it
    plugins.emit("task_started", task=8)
    echo = host.plugin("echo")
    assert isinstance(echo, Echo)
    assert echo.seen == [("task_started", 7), ("task_started", 8)]
    assert host.names() == ["echo"]
    assert HookFails.closed == 1
    with pytest.raises(ServiceNotFoundError, match="hook task_started: ValueError"):
        host.call("hook_fails.ping", (), {})
    assert events.task_started  # Echo still listens
    host.close()
    rows = {r.name: r for r in read_plugins(str(tmp_path))}
    assert rows["hook_fails"].failures == (
        "supervisor: hook task_started: ValueError: cannot handle task 7",
    )


def test_a_worker_host_builds_its_own_instances(tmp_path, host_factory):
    sup = _load(host_factory, tmp_path, Echo, SetupFails)
    worker = sup.for_worker(3)
    host_factory.append(worker)
    assert worker.names() == ["echo"]
    assert worker.plugin("echo") is not sup.plugin("echo")
    assert worker.call("echo.whoami", (), {}) == ("worker", 3)
    assert sup.call("echo.whoami", (), {}) == ("supervisor", -1)


def test_registrations_after_setup_take_effect_at_once(tmp_path, host_factory):
    class Late(Plugin):
        name = "late"

        def setup(self, ctx: PluginContext) -> None:
            ctx.service("more", lambda: ctx.service("extra", lambda: "here"))

    host = _load(host_factory, tmp_path, Late)
    with pytest.raises(ServiceNotFoundError):
        host.call("late.extra", (), {})
    assert host.call("late.more", (), {}) == "late.extra"
    assert host.call("late.extra", (), {}) == "here"


def test_call_service_outside_any_kernel_raises_not_found():
    with pytest.raises(ServiceNotFoundError, match="runs no plugins"):
        plugins.call_service("memory.get", ("ns", "k"), {})


# ---- Supervisor services (protocol 6), over real socketpairs ----


class Tally(Plugin):
    """A singleton counter in the supervisor, and what goes wrong around it."""

    name = "tally"

    def setup(self, ctx: PluginContext) -> None:
        self.n = 0
        self.gate = threading.Event()
        self.gate.set()
        ctx.service("next", self.next, where="supervisor")
        ctx.service("boom", self.boom, where="supervisor")
        ctx.service("wait", self.gate.wait, where="supervisor")
        ctx.service("big", lambda: b"x" * (1 << 21), where="supervisor")
        ctx.service("local", lambda: (ctx.role, ctx.worker))
        if ctx.role == "supervisor":  # registered here only: a worker asks anyway
            ctx.service("only_here", lambda: ctx.role, where="supervisor")

    def next(self) -> int:
        self.n += 1
        return self.n

    def boom(self, what: str) -> None:
        raise ValueError(f"no {what}")


def _serve(sup: PluginHost, sock: socket.socket) -> threading.Thread:
    """Answer ``sock``'s calls on a thread, as the supervisor's loop would, until EOF."""

    def loop() -> None:
        with sock:
            while True:
                select.select([sock], [], [])
                if not sup.serve(sock):
                    return

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def linked(tmp_path, host_factory) -> Iterator[Callable[..., PluginHost]]:
    """Worker hosts linked to one supervisor host (Tally loaded), each link served by a
    thread; closing the worker hosts ends the threads."""
    sup = _load(host_factory, tmp_path, Tally)
    threads = []

    def worker(index: int, timeout_s: float = 10.0) -> PluginHost:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        threads.append(_serve(sup, ours))
        host = sup.for_worker(index, SupervisorLink(theirs, timeout_s))
        host_factory.append(host)
        return host

    worker.sup = sup  # type: ignore[attr-defined]
    yield worker
    for host in host_factory[1:]:
        host.close()
    for thread in threads:
        thread.join(timeout=10)


def test_supervisor_services_run_in_the_one_supervisor_instance(linked):
    w0, w1 = linked(0), linked(1)
    seen = [w.call("tally.next", (), {}) for _ in range(5) for w in (w0, w1)]
    assert seen == list(range(1, 11))
    assert linked.sup.plugin("tally").n == 10
    assert w0.plugin("tally").n == w1.plugin("tally").n == 0  # the workers' never ran
    assert w1.call("tally.local", (), {}) == ("worker", 1)  # where="worker": right here
    assert w0.call("tally.only_here", (), {}) == "supervisor"


def test_a_supervisor_service_error_reaches_the_caller_with_its_type(linked):
    w0 = linked(0)
    with pytest.raises(ValueError, match="no luck") as info:
        w0.call("tally.boom", ("luck",), {})
    assert "in boom" in str(info.value.__cause__)  # the supervisor-side traceback
    with pytest.raises(ServiceNotFoundError, match=r"no service 'tally\.nope' in the supervisor"):
        w0.call("tally.nope", (), {})
    with pytest.raises(PluginError, match="over the link's limit"):
        w0.call("tally.big", (), {})
    assert w0.call("tally.next", (), {}) == 1  # the link is still good


def test_a_late_reply_is_skipped_and_a_dead_supervisor_is_reported(linked):
    w0 = linked(0, timeout_s=0.05)
    tally = linked.sup.plugin("tally")
    tally.gate.clear()
    with pytest.raises(PluginError, match="no answer from the supervisor"):
        w0.call("tally.wait", (), {})
    tally.gate.set()  # its reply comes now, to a call nobody waits for
    assert w0.call("tally.next", (), {}) == 1
    orphan = linked.sup.for_worker(2)  # no link: a supervisor service is out of reach
    with pytest.raises(PluginError, match="no link"):
        orphan.call("tally.next", (), {})
    orphan.close()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.close()
    link = SupervisorLink(theirs, 10.0)
    with pytest.raises(PluginError, match="the supervisor is gone"):
        link.call("tally.next", (), {})
    link.close()


def test_where_is_checked_and_recorded_in_the_status(tmp_path, host_factory):
    class Bad(Plugin):
        name = "bad"

        def setup(self, ctx: PluginContext) -> None:
            ctx.service("x", lambda: None, where="elsewhere")  # type: ignore[arg-type]

    _load(host_factory, tmp_path, Tally, Bad).close()
    rows = {r.name: r for r in read_plugins(str(tmp_path))}
    assert rows["tally"].supervisor_services == (
        "tally.next", "tally.boom", "tally.wait", "tally.big", "tally.only_here",
    )  # fmt: skip
    assert "tally.local" in rows["tally"].services
    assert rows["bad"].error == "PluginError: bad where 'elsewhere': 'worker' or 'supervisor'"


# ---- The context: names, tables, paths, tools ----


def test_registration_checks_names_and_event_kinds(tmp_path, host_factory):
    errors = []

    class Picky(Plugin):
        name = "picky"

        def setup(self, ctx: PluginContext) -> None:
            for bad in (lambda: ctx.service("Bad Name", len), lambda: ctx.on("nope", print)):
                try:
                    bad()
                except PluginError as exc:
                    errors.append(str(exc))
            ctx.service("ok", len)
            with pytest.raises(PluginError, match="already registered"):
                ctx.service("ok", len)

    _load(host_factory, tmp_path, Picky)
    assert len(errors) == 2
    assert "bad name" in errors[0]
    assert "unknown event 'nope'" in errors[1]


def test_a_plugin_owns_a_table_and_a_directory(tmp_path, host_factory):
    class Keeper(Plugin):
        name = "keeper"

        def setup(self, ctx: PluginContext) -> None:
            self.ctx = ctx

    host = _load(host_factory, tmp_path, Keeper)
    keeper = host.plugin("keeper")
    assert isinstance(keeper, Keeper)
    keeper.ctx.table().put(b"k", b"v")
    keeper.ctx.table("other").put(b"k", b"w")
    assert keeper.ctx.table().get(b"k") == b"v"
    assert keeper.ctx.table("other").get(b"k") == b"w"
    path = keeper.ctx.path()
    assert path == str(tmp_path / "plugins.d" / "keeper")
    assert (tmp_path / "plugins.d" / "keeper").stat().st_mode & 0o777 == 0o700


def test_plugin_tools_are_named_after_the_plugin_and_checked(tmp_path, host_factory):
    class Tooled(Plugin):
        name = "tooled"

        def setup(self, ctx: PluginContext) -> None:
            ctx.tool("count", len, cpu_s=2, timeout_s=5)
            with pytest.raises(ValueError, match="profile"):
                ctx.tool("bad", len, profile="no-such-profile")

    host = _load(host_factory, tmp_path, Tooled)
    spec = host.tool_spec("tooled.count")
    assert spec is not None
    assert spec.name == "tooled.count"
    assert dict(spec.policy) == {"profile": "python", "cpu_s": 2, "wall_s": 5}
    assert host.tool_spec("count") is None


def test_candidates_carry_their_errors():
    cand = Candidate("x", "x", "test", error="boom")
    assert cand.cls is None
    assert cand.error == "boom"


# ---- Routing (protocol 7) ----


class Routes(Plugin):
    """Registers a router of its own: the default one under another identity."""

    name = "routes"
    default = False

    def setup(self, ctx: PluginContext) -> None:
        self.router = DefaultRouter()
        ctx.router(self.router, default=self.default)


class DefaultRoutes(Routes):
    name = "default_routes"
    default = True


class MoreRoutes(Routes):
    name = "more_routes"


class TwiceRoutes(Routes):
    name = "twice_routes"

    def setup(self, ctx: PluginContext) -> None:
        super().setup(ctx)
        ctx.router(DefaultRouter())


class LateRoutes(Plugin):
    name = "late_routes"

    def setup(self, ctx: PluginContext) -> None:
        self.ctx = ctx


def test_without_plugins_the_router_is_the_default_one():
    assert plugins.current() is None
    router = plugins.router()
    assert isinstance(router, DefaultRouter)
    assert isinstance(router.topics(), TopicTable)
    assert router.topics() is not router.topics()  # one table per agent host


def test_a_plugins_router_replaces_the_default_and_a_second_is_refused(tmp_path, host_factory):
    host = _load(host_factory, tmp_path, DefaultRoutes, Routes, MoreRoutes)
    assert host.names() == ["default_routes", "routes"]
    plugins.activate(host)
    chosen = host.plugin("routes")
    assert isinstance(chosen, Routes)
    assert plugins.router() is chosen.router
    host.close()
    rows = {r.name: r for r in read_plugins(str(tmp_path))}
    assert (rows["routes"].router, rows["default_routes"].router) == ("in use", "replaced")
    refused = "PluginError: a router is registered already, by plugin 'routes'"
    assert (rows["more_routes"].state, rows["more_routes"].error) == ("disabled", refused)
    assert rows["more_routes"].failures == (f"supervisor: setup: {refused}",)
    alone = _load(host_factory, tmp_path / "twice", TwiceRoutes)  # one plugin, two routers
    assert alone.names() == []
    alone.close()
    (row,) = read_plugins(str(tmp_path / "twice"))
    assert row.error == "PluginError: a router is registered already, by plugin 'twice_routes'"


def test_the_default_router_serves_when_no_other_and_after_setup_none_is_taken(
    tmp_path, host_factory
):
    host = _load(host_factory, tmp_path, DefaultRoutes, LateRoutes)
    worker = host.for_worker(0)  # each worker registers its own instance's router
    host_factory.append(worker)
    plugins.activate(worker)
    mine = worker.plugin("default_routes")
    assert isinstance(mine, DefaultRoutes)
    assert plugins.router() is mine.router
    assert mine.router is not cast("DefaultRoutes", host.plugin("default_routes")).router
    late = worker.plugin("late_routes")
    assert isinstance(late, LateRoutes)
    with pytest.raises(PluginError, match="in setup"):
        late.ctx.router(DefaultRouter())
    worker.disable("default_routes", "test", RuntimeError("gone"))
    assert isinstance(plugins.router(), DefaultRouter)  # the fallback, not the disabled one
    assert plugins.router() is not mine.router
