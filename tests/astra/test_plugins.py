"""Plugins in real kernels (kernel/plugins.py through astra): lifecycle events seen in order
in the workers, services and tools from clients and agents, supervisor services (one
instance, through worker restarts), failing plugins disabled and reported while the kernel
carries on, discovery by entry point and by ``astrad --plugin``,
``astra plugins``, and the docs' example installed with pip and run as written."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import tomllib

import pytest

import astra
from astra._cli import EXIT_OK, main
from astra.plugin import Event, Plugin, PluginContext
from tests.astra.conftest import Astrad
from tests.helpers import wait_until
from tests.kernel.test_plugins import install_dist

pytestmark = pytest.mark.multiprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---- Plugins used below (importable, so astrad can load them by name) ----


def shout(text):
    return text.upper() + "!"


class Recorder(Plugin):
    """Records every event of every process in its own table, in emission order per process;
    offers them back as a service, and a sandboxed tool."""

    name = "recorder"

    def setup(self, ctx: PluginContext) -> None:
        self.ctx = ctx
        self.seq = itertools.count()
        self.lock = threading.Lock()
        ctx.on("*", self.record)
        ctx.service("events", self.events)
        ctx.service("where", lambda: (ctx.role, ctx.worker, os.getpid()))
        ctx.tool("shout", shout, timeout_s=10)

    def record(self, event: Event) -> None:
        with self.lock:
            key = f"{event.worker:03d}.{os.getpid():08d}.{next(self.seq):09d}".encode()
        value = json.dumps([event.kind, event.agent, event.task, event.name, event.detail])
        self.ctx.table().put(key, value.encode())

    def events(self) -> list[list[object]]:
        return [json.loads(v) for _, v in self.ctx.table().scan()]


class SetupFails(Plugin):
    name = "setup_fails"

    def setup(self, ctx: PluginContext) -> None:
        raise RuntimeError("needs a config it does not have")


class HookFails(Plugin):
    name = "hook_fails"

    def setup(self, ctx: PluginContext) -> None:
        ctx.service("alive", lambda: True)
        ctx.on("tool_called", self.boom)

    def boom(self, event: Event) -> None:
        raise ValueError(f"cannot take {event.name}")


def _ok(x):
    return x + 1


def _fail(x):
    raise KeyError(x)


async def _later(x):
    await asyncio.sleep(0)
    return x


def _events(k, kinds=None):
    rows = k.call_service("recorder.events").result(timeout=30)
    return [r for r in rows if kinds is None or r[0] in kinds]


# ---- Events, services and tools in an embedded kernel ----


@pytest.mark.slow
def test_tool_events_and_plugin_tools(kernel1_recorder):
    k = kernel1_recorder
    assert k.call_tool("recorder.shout", "hi").result(timeout=30) == "HI!"
    with pytest.raises(astra.CapabilityError):
        k.call_tool("recorder.nope")
    assert _events(k, {"tool_called"}) == [["tool_called", "", 0, "recorder.shout", "ok"]]
    assert [(e.tool, e.outcome) for e in k.audit()] == [("recorder.shout", "ok")]


@pytest.mark.slow
def test_task_events_are_seen_in_order(kernel1_recorder):
    k = kernel1_recorder
    ok = k.submit(_ok, 1)
    assert ok.result(timeout=30) == 2
    bad = k.submit(_fail, "x")
    with pytest.raises(KeyError):
        bad.result(timeout=30)
    assert k.submit(_later, 5).result(timeout=30) == 5
    tasks = [e for e in _events(k) if e[0].startswith("task_") and e[3] != "call_service"]
    assert [(kind, name, detail) for kind, _, _, name, detail in tasks] == [
        ("task_submitted", "_ok", ""),
        ("task_started", "_ok", ""),
        ("task_finished", "_ok", ""),
        ("task_submitted", "_fail", ""),
        ("task_started", "_fail", ""),
        ("task_failed", "_fail", "KeyError"),
        ("task_submitted", "_later", ""),
        ("task_started", "_later", ""),
        ("task_finished", "_later", ""),
    ]
    ids = [task for _, _, task, _, _ in tasks]
    assert len(set(ids[0:3])) == len(set(ids[3:6])) == len(set(ids[6:9])) == 1
    assert len({ids[0], ids[3], ids[6]}) == 3


class Fragile(astra.Agent):
    def __init__(self):
        self.n = 0

    def bump(self):
        self.n += 1
        return self.n

    def crash(self):
        raise RuntimeError("crash on purpose")


@pytest.mark.slow
def test_agent_events_are_seen_in_order(kernel1_recorder):
    k = kernel1_recorder
    ref = k.spawn(Fragile, name="frag", restart="on-failure")
    assert ref.ask("bump").result(timeout=30) == 1
    with pytest.raises(RuntimeError):
        ref.ask("crash").result(timeout=30)
    assert ref.ask("bump").result(timeout=30) == 1  # a fresh instance
    ref.stop()
    agents = [(kind, agent, name, detail) for kind, agent, _, name, detail in _events(k)
              if kind.startswith("agent_")]  # fmt: skip
    assert agents == [
        ("agent_spawned", "frag", "Fragile", ""),
        ("agent_restarted", "frag", "Fragile", "RuntimeError"),
        ("agent_stopped", "frag", "Fragile", "stopped"),
    ]


class ServiceUser(astra.Agent):
    async def where(self):
        return await self.service("recorder.where")

    async def missing(self):
        try:
            await self.service("nobody.nothing")
        except astra.errors.ServiceNotFoundError as exc:
            return str(exc)
        return "no error"


@pytest.mark.slow
def test_agents_call_services_in_their_own_worker(kernel_recorder):
    k = kernel_recorder
    for worker in (0, 1):
        ref = k.spawn(ServiceUser, worker=worker)
        role, index, pid = ref.ask("where").result(timeout=30)
        assert (role, index, pid) == ("worker", worker, k.worker_pids()[worker])
        assert "no service 'nobody.nothing'" in ref.ask("missing").result(timeout=30)


class ToolUser(astra.Agent):
    async def shout(self, text):
        try:
            return await self.tool("recorder.shout", text)
        except astra.CapabilityError as exc:
            return f"refused: {exc}"


@pytest.mark.slow
def test_agents_are_granted_plugin_tools_like_any_tool(kernel1_recorder):
    k = kernel1_recorder
    granted = k.spawn(ToolUser, name="granted", tools=["recorder.shout"])
    other = k.spawn(ToolUser, name="other")
    assert granted.ask("shout", "hey").result(timeout=30) == "HEY!"
    assert other.ask("shout", "hey").result(timeout=30).startswith("refused: ")
    assert [e[1:] for e in _events(k, {"tool_called"})] == [
        ["granted", 0, "recorder.shout", "ok"],
        ["other", 0, "recorder.shout", "refused"],
    ]
    with pytest.raises(astra.CapabilityError):
        k.spawn(ToolUser, tools=["recorder.whisper"])


# ---- Supervisor services: one instance per kernel ----


class Ticket(Plugin):
    """A kernel-wide ticket counter: a singleton in the supervisor."""

    name = "ticket"

    def setup(self, ctx: PluginContext) -> None:
        self.n = 0
        ctx.service("next", self.next, where="supervisor")
        ctx.service("where", lambda: (ctx.role, os.getpid()), where="supervisor")
        ctx.service("fail", self.fail, where="supervisor")

    def next(self) -> int:
        self.n += 1  # no lock: the supervisor runs its services one at a time
        return self.n

    def fail(self, key):
        raise KeyError(key)


class TicketTaker(astra.Agent):
    async def take(self, n):
        return [await self.service("ticket.next") for _ in range(n)]

    async def where(self):
        return await self.service("ticket.where")

    async def fail(self):
        try:
            await self.service("ticket.fail", "gone")
        except KeyError as exc:
            return repr(exc)
        return "no error"


def _links(pid):
    """How many SOCK_SEQPACKET sockets (supervisor links) process ``pid`` holds."""
    with open("/proc/net/unix") as f:
        seqpacket = {line.split()[6] for line in f.readlines()[1:] if line.split()[4] == "0005"}
    targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    return sum(t.startswith("socket:[") and t[8:-1] in seqpacket for t in targets)


@pytest.mark.slow
def test_a_supervisor_service_is_one_instance_for_clients_and_agents():
    with astra.Kernel(workers=2, plugins=[Ticket]) as k:
        sup = k.supervisor_pid
        takers = [k.spawn(TicketTaker, worker=w) for w in (0, 1)]
        asks = [t.ask("take", 30) for t in takers]
        calls = [k.call_service("ticket.next") for _ in range(30)]
        by_agent = [a.result(timeout=30) for a in asks]
        by_client = [c.result(timeout=30) for c in calls]
        for seq in by_agent:
            assert seq == sorted(seq)  # each caller sees its own calls in order
        assert sorted(by_agent[0] + by_agent[1] + by_client) == list(range(1, 91))
        assert takers[1].ask("where").result(timeout=30) == ("supervisor", sup)
        assert k.call_service("ticket.where").result(timeout=30) == ("supervisor", sup)
        # The service's own exception reaches both kinds of caller with its type.
        assert takers[0].ask("fail").result(timeout=30) == "KeyError('gone')"
        with pytest.raises(KeyError, match="gone"):
            k.call_service("ticket.fail", "gone").result(timeout=30)
        with pytest.raises(astra.errors.ServiceNotFoundError, match="in the supervisor"):
            k.call_service("ticket.nope").result(timeout=30)
        row = next(r for r in k.plugins() if r.name == "ticket")
        assert row.supervisor_services == ("ticket.next", "ticket.where", "ticket.fail")
        assert _links(sup) == 2  # one link per worker
        assert [_links(pid) for pid in k.worker_pids()] == [1, 1]  # its own only


@pytest.mark.slow
def test_a_restarted_worker_gets_a_new_link_and_the_same_instance():
    with astra.Kernel(workers=2, plugins=[Ticket]) as k:
        sup = k.supervisor_pid
        taker = k.spawn(TicketTaker, name="taker", worker=0)
        assert taker.ask("take", 3).result(timeout=30) == [1, 2, 3]
        old = k.worker_pids()[0]
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: k.worker_pids()[0] not in (0, old), timeout_s=30)
        wait_until(lambda: k._agents.registry.lookup("taker") == 1, timeout_s=30)
        # taker moved to w01; a new agent on the new w00 calls through the new link.
        assert taker.ask("take", 1).result(timeout=30) == [4]
        fresh = k.spawn(TicketTaker, name="fresh", worker=0)
        assert fresh.ask("take", 2).result(timeout=30) == [5, 6]
        assert k.call_service("ticket.next").result(timeout=30) == 7
        assert _links(sup) == 2  # the dead workers' links were closed
        assert [_links(pid) for pid in k.worker_pids()] == [1, 1]


# ---- Failure isolation ----


@pytest.mark.slow
def test_failing_plugins_are_disabled_and_reported_while_the_kernel_carries_on():
    with astra.Kernel(workers=1, plugins=[SetupFails, HookFails, Recorder]) as k:
        pids = k.worker_pids()
        assert k.call_service("hook_fails.alive").result(timeout=30) is True
        assert k.call_tool("recorder.shout", "a").result(timeout=30) == "A!"  # hook raises
        assert k.call_tool("recorder.shout", "b").result(timeout=30) == "B!"
        with pytest.raises(astra.errors.ServiceNotFoundError, match="disabled in w00"):
            k.call_service("hook_fails.alive").result(timeout=30)
        with pytest.raises(astra.errors.ServiceNotFoundError, match="needs a config"):
            k.call_service("setup_fails.anything").result(timeout=30)
        assert k.worker_pids() == pids  # nobody died
        assert len(_events(k, {"tool_called"})) == 2  # the other plugin saw both
        rows = {r.name: r for r in k.plugins()}
    assert rows["memory"].state == "enabled"
    assert rows["recorder"].state == "enabled"
    assert rows["setup_fails"].state == "disabled"
    assert rows["setup_fails"].error == "RuntimeError: needs a config it does not have"
    assert rows["hook_fails"].state == "enabled"  # it loaded; it failed later, in w00
    assert rows["hook_fails"].failures == (
        "w00: hook tool_called: ValueError: cannot take recorder.shout",
    )


# ---- astrad: entry points, --plugin, astra plugins ----

_FAKE = """
from astra.plugin import Plugin

class Greeter(Plugin):
    name = "greeter"
    def setup(self, ctx):
        ctx.service("hello", lambda who: f"hello {who} from {ctx.role} {ctx.worker}")
"""


@pytest.mark.slow
def test_astrad_loads_entry_points_and_flagged_plugins(tmp_path, monkeypatch, capsys):
    site = install_dist(
        tmp_path / "site",
        "astra_greeter",
        {"astra_greeter": _FAKE, "astra_badmod": "raise ImportError('broken on purpose')\n"},
        {"greeter": "astra_greeter:Greeter", "badmod": "astra_badmod:Thing"},
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), ROOT]))
    daemon = Astrad(
        str(tmp_path / "state"),
        extra=tuple(
            arg
            for cls in ("Recorder", "SetupFails", "Ticket")
            for arg in ("--plugin", f"{__name__}:{cls}")
        ),
    ).start()
    try:
        with daemon.connect() as client:
            hello = client.call_service("greeter.hello", "ann").result(timeout=30)
            assert hello.startswith("hello ann from worker ")
            assert client.call_tool("recorder.shout", "x").result(timeout=30) == "X!"
            tickets = [client.call_service("ticket.next") for _ in range(4)]
            assert sorted(t.result(timeout=30) for t in tickets) == [1, 2, 3, 4]
            mem = client.memory("team")
            mem.put("k", [1, 2])
            assert mem.get("k") == [1, 2]
        where = ["--name", daemon.name, "--state-dir", daemon.state_dir]
        capsys.readouterr()
        assert main(["plugins", *where, "--json"]) == EXIT_OK
        rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
        assert main(["plugins", *where]) == EXIT_OK
        table = capsys.readouterr().out
    finally:
        assert daemon.stop() == 0
    assert rows["memory"]["source"] == "builtin"
    assert rows["greeter"]["source"] == "entry point greeter (astra_greeter)"
    assert rows["greeter"]["services"] == ["greeter.hello"]
    assert rows["badmod"]["state"] == "disabled"
    assert "broken on purpose" in rows["badmod"]["error"]
    assert rows["recorder"]["source"] == "flag --plugin"
    assert rows["recorder"]["tools"] == ["recorder.shout"]
    assert rows["setup_fails"]["state"] == "disabled"
    assert rows["ticket"]["supervisor_services"] == ["ticket.next", "ticket.where", "ticket.fail"]
    assert "    in the supervisor: ticket.next, ticket.where, ticket.fail" in table
    assert re.search(r"setup_fails +disabled", table)
    assert "error: RuntimeError: needs a config it does not have" in table


# ---- The docs' example, installed and run exactly as written ----


def _doc_blocks() -> dict[str, str]:
    with open(os.path.join(ROOT, "docs", "plugins.md")) as f:
        text = f.read()
    section = text.split("## A complete third-party plugin", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, re.S)
    assert [lang for lang, _ in blocks] == ["python", "toml", "python"]
    return {"module": blocks[0][1], "pyproject": blocks[1][1], "usage": blocks[2][1]}


def test_the_docs_example_plugin_is_under_40_lines():
    blocks = _doc_blocks()
    assert len(blocks["module"].splitlines()) + len(blocks["pyproject"].splitlines()) < 40


@pytest.mark.slow
def test_the_docs_example_installs_and_runs(tmp_path):
    """Installs the example the way pip lays a distribution out (its module beside a
    dist-info whose entry_points.txt comes from the pyproject block; pip itself would need
    the ``wheel`` package to build one), then runs the usage block in a fresh process."""
    blocks = _doc_blocks()
    project = tomllib.loads(blocks["pyproject"])["project"]
    entry_points = project["entry-points"]["astra.plugins"]
    module = entry_points["taskcount"].split(":")[0]
    site = install_dist(
        tmp_path / "site", project["name"].replace("-", "_"), {module: blocks["module"]},
        entry_points,
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), ROOT])}
    run = subprocess.run(
        [sys.executable, "-c", blocks["usage"]],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "{'abs': 10}"


# ---- Fixtures ----


@pytest.fixture
def kernel1_recorder():
    with astra.Kernel(workers=1, plugins=[Recorder]) as k:
        yield k


@pytest.fixture
def kernel_recorder():
    with astra.Kernel(workers=2, plugins=[Recorder]) as k:
        yield k
