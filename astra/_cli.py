"""The ``astra`` and ``astrad`` command lines.

``astrad [--workers N] [--name NAME] [--state-dir DIR] [--plugin PKG.MOD:CLASS]`` runs the
daemon in the foreground (systemd runs it as a service). ``astra status|ps|stop [--json]``
inspect and stop a running daemon, ``astra plugins`` lists its plugins, ``astra demo``
starts an embedded kernel and runs a small task demo, and ``astra cleanup`` removes the
shared memory of dead instances.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any, Final

import msgspec
import psutil  # type: ignore[import-untyped]

from ipc import Instance, IPCError, cleanup_stale, is_alive
from kernel import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    ControlBlock,
    InstanceExistsError,
    Notifier,
    RestartPolicy,
    collect_kernel_metrics,
    config_keys,
    configure_logging,
    default_state_dir,
    format_config,
    list_states,
    load_config,
    read_state,
    render_kernel_metrics,
    run_daemon,
)
from kernel.plugins import discover, read_plugins
from kernel.tools import read_audit

from ._errors import AgentNotFoundError, AstraError
from ._kernel import BUILTIN_PLUGINS, connect
from ._service import UNIT_NAME, install_unit, render_unit
from ._top import metrics_snapshot
from ._version import __version__

if TYPE_CHECKING:
    from kernel import DaemonState

    from ._client import Client

#: Exit codes (sysexits.h values where one fits).
EXIT_OK: Final = 0
EXIT_USAGE: Final = 64
EXIT_NOT_FOUND: Final = 1  # astra kill: no agent of that name
EXIT_UNAVAILABLE: Final = 69
EXIT_TEMPFAIL: Final = 75  # astrad: another live astrad has this name
EXIT_OSERR: Final = 71  # astrad: an operating-system error at start (a port in use...)
EXIT_CANTCREAT: Final = 73  # astra service install: the unit could not be written
EXIT_CONFIG: Final = 78  # astrad: a bad configuration; nothing was started

#: How long ``astra stop`` waits for the daemon to exit by default.
STOP_TIMEOUT_S: Final = 30.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="astra", description="Astra: an OS for AI agents.")
    parser.add_argument("--version", action="version", version=f"astra {__version__}")
    sub = parser.add_subparsers(dest="command")
    clean = sub.add_parser("cleanup", help="remove shared memory left by dead Astra instances")
    clean.add_argument("--label", default=None, help="only instances with this label")
    clean.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    for name, text in (
        ("status", "the daemon's instance, uptime and workers"),
        ("metrics", "the daemon's metrics in the Prometheus text format"),
        ("ps", "the processes and agents of running daemons"),
        ("stop", "stop a daemon (SIGTERM: it drains, then exits)"),
        ("kill", "stop an agent at once, dropping its mailbox"),
        ("audit", "the daemon's tool calls: agent, tool, outcome, duration, peak RSS"),
        ("plugins", "the daemon's plugins: state, source, services, tools, events, failures"),
    ):
        p = sub.add_parser(name, help=text)
        if name == "kill":
            p.add_argument("agent", help="the agent's name")
        p.add_argument("--name", default="default", help="daemon name (default: default)")
        p.add_argument("--state-dir", default=None, help="daemon state directory")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "stop":
            p.add_argument("--timeout", type=float, default=STOP_TIMEOUT_S)
        if name == "audit":
            p.add_argument("--tail", type=int, default=None, help="only the last N calls")
    top = sub.add_parser("top", help="a live view of a running astrad (q quits)")
    top.add_argument("--name", default="default", help="daemon name (default: default)")
    top.add_argument("--state-dir", default=None, help="daemon state directory")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    # `astra demo ARGS` goes straight to astra._demo.main (main() below); listed here for --help.
    sub.add_parser(
        "demo", add_help=False,
        help="a code-review team of agents, a DAG and sandboxed tools on an embedded kernel "
        "(astra demo --help)",
    )  # fmt: skip
    service = sub.add_parser("service", help="run astrad as a systemd service")
    service_sub = service.add_subparsers(dest="action", required=True)
    install = service_sub.add_parser("install", help=f"write {UNIT_NAME} for systemd")
    install.add_argument("--unit-dir", default="/etc/systemd/system")
    install.add_argument("--user", default="astra", help="account astrad runs as")
    install.add_argument("--astrad", default=None, help="absolute path of astrad")
    install.add_argument("--args", default="", help="extra astrad arguments")
    install.add_argument("--print", action="store_true", help="print the unit, write nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``astra``. Returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        from ._demo import main as demo_main

        return demo_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "cleanup":
        removed = cleanup_stale(args.label)
        if not args.quiet:
            for entry in removed:
                print(f"removed /dev/shm/{entry}")
            print(f"{len(removed)} stale object(s) removed")
        return EXIT_OK
    if args.command == "status":
        return _status(args)
    if args.command == "ps":
        return _ps(args)
    if args.command == "metrics":
        return _metrics(args)
    if args.command == "top":
        return _top(args)
    if args.command == "stop":
        return _stop(args)
    if args.command == "kill":
        return _kill(args)
    if args.command == "audit":
        return _audit(args)
    if args.command == "plugins":
        return _plugins(args)
    if args.command == "service":
        return _service_install(args)
    _parser().print_help(sys.stderr)
    return EXIT_USAGE


# ---- service ----


def _service_install(args: argparse.Namespace) -> int:
    options = {"astrad": args.astrad, "args": args.args, "user": args.user}
    try:
        if args.print:
            print(render_unit(**options), end="")
            return EXIT_OK
        path = install_unit(args.unit_dir, **options)
    except (ValueError, OSError) as exc:
        print(f"astra: {exc}", file=sys.stderr)
        return EXIT_CANTCREAT
    print(f"wrote {path}; then, as root:")
    print(f"  useradd --system --no-create-home {args.user}   # once")
    print("  systemctl daemon-reload && systemctl enable --now astrad")
    return EXIT_OK


# ---- status, ps, stop ----


def _live_state(args: argparse.Namespace) -> DaemonState | None:
    state = read_state(args.name, args.state_dir)
    if state is None or not is_alive(state.pid, state.start):
        print(f"astra: no astrad named {args.name!r} is running", file=sys.stderr)
        return None
    return state


def _proc_info(pid: int, procs: dict[int, psutil.Process]) -> dict[str, object]:
    p = procs.get(pid)
    if p is None:
        return {"cpu_percent": None, "rss_bytes": None}
    try:
        return {"cpu_percent": p.cpu_percent(None), "rss_bytes": p.memory_info().rss}
    except psutil.Error:
        return {"cpu_percent": None, "rss_bytes": None}


def _snapshot(state: DaemonState) -> dict[str, Any]:
    inst = Instance.attach(state.instance)
    control = ControlBlock.open(inst)
    try:
        rows = [control.worker(i) for i in range(control.workers)]
        procs = {}
        for pid in [state.pid] + [r.pid for r in rows]:
            try:
                procs[pid] = psutil.Process(pid)
                procs[pid].cpu_percent(None)  # the first call starts the sample
            except psutil.Error:
                pass
        time.sleep(0.1)  # CPU% needs an interval
        workers = [
            {
                "id": f"w{r.index:02d}",
                "pid": r.pid,
                "core": r.core,
                "queued": r.queued,
                "tasks_done": r.tasks_done,
                "restarts": r.restarts,
                "steals": r.steals,
                # live words, read without the worker's help: a display, not a record
                "running": _running_label(control.running(r.index)),
                **_proc_info(r.pid, procs),
            }
            for r in rows
        ]
        return {
            "name": state.name,
            "instance": state.instance,
            "pid": state.pid,
            "state": control.state.name.lower(),
            "uptime_s": round(time.time() - state.started, 3),
            "clients": [{"slot": c.slot, "pid": c.pid} for c in control.clients()],
            "astrad": _proc_info(state.pid, procs),
            "workers": workers,
            "metrics": metrics_snapshot(control),  # tasks failed, tool calls by outcome
        }
    finally:
        control.close()


def _top(args: argparse.Namespace) -> int:
    from ._top import run_top

    state = _live_state(args)
    if state is None:
        return EXIT_UNAVAILABLE
    client: Client | None = None
    with contextlib.suppress(AstraError):  # no free client slot: workers only
        client = connect(args.name, state_dir=args.state_dir)

    def snapshot() -> dict[str, Any]:
        snap = _snapshot(state)
        if client is not None:
            try:
                snap["agents"] = client.agents(timeout=2.0)
            except (AstraError, TimeoutError):
                snap["agents"] = []
        return snap

    try:
        return run_top(snapshot, once=args.once)
    except (IPCError, OSError) as exc:
        print(f"astra: astrad {args.name!r} went away: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    finally:
        if client is not None:
            client.close()


def _metrics(args: argparse.Namespace) -> int:
    state = _live_state(args)
    if state is None:
        return EXIT_UNAVAILABLE
    try:
        control = ControlBlock.open(Instance.attach(state.instance))
    except (IPCError, OSError) as exc:
        print(f"astra: astrad {args.name!r} is not reachable: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    try:
        if args.json:
            print(json.dumps(_jsonable(collect_kernel_metrics(control))))
        else:
            print(render_kernel_metrics(control), end="")
    finally:
        control.close()
    return EXIT_OK


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, dict):
            out[name] = {",".join(f"{k}={v}" for k, v in labels): n for labels, n in value.items()}
        else:
            out[name] = value
    return out


def _running_label(running: tuple[int, int]) -> str:
    client, task = running
    return "-" if client < 0 else f"c{client}:t{task}"


def _status(args: argparse.Namespace) -> int:
    state = _live_state(args)
    if state is None:
        return EXIT_UNAVAILABLE
    try:
        snap = _snapshot(state)
    except (IPCError, OSError) as exc:
        print(f"astra: astrad {args.name!r} is not reachable: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if args.json:
        print(json.dumps(snap))
        return EXIT_OK
    print(
        f"astrad {snap['name']!r}  pid {snap['pid']}  instance {snap['instance']}  "
        f"{snap['state']}  up {snap['uptime_s']:.0f} s  clients {len(snap['clients'])}"
    )
    print(f"{'worker':<7}{'pid':>8}{'core':>6}{'cpu%':>7}{'rss MiB':>9}{'queued':>8}{'done':>10}")
    for w in snap["workers"]:
        print(_worker_line(w))
    return EXIT_OK


def _worker_line(w: dict[str, Any]) -> str:
    core = "-" if w["core"] is None else str(w["core"])
    cpu = "-" if w["cpu_percent"] is None else f"{w['cpu_percent']:.1f}"
    rss = "-" if w["rss_bytes"] is None else f"{w['rss_bytes'] / 2**20:.1f}"
    return (
        f"{w['id']:<7}{w['pid']:>8}{core:>6}{cpu:>7}{rss:>9}{w['queued']:>8}{w['tasks_done']:>10}"
    )


def _ps(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    agents: list[dict[str, Any]] = []
    for state in list_states(args.state_dir):
        if not is_alive(state.pid, state.start):
            continue
        rows.append({"name": state.name, "pid": state.pid, "role": "astrad"})
        try:
            children = psutil.Process(state.pid).children()
        except psutil.Error:
            children = []
        for child in children:
            try:
                rows.append({"name": state.name, "pid": child.pid, "role": child.name()})
            except psutil.Error:
                continue
        agents += [{"daemon": state.name, **row} for row in _agent_rows(state.name, args)]
    if args.json:
        print(json.dumps({"processes": rows, "agents": agents}))
        return EXIT_OK
    print(f"{'name':<16}{'pid':>8}  role")
    for r in rows:
        print(f"{r['name']:<16}{r['pid']:>8}  {r['role']}")
    if agents:
        print()
        print(
            f"{'agent':<24}{'class':<20}{'worker':>7}{'mailbox':>9}{'handled':>9}"
            f"  {'state':<9}{'restarts':>8}"
        )
        for a in agents:
            worker = f"w{a['worker']:02d}"
            print(
                f"{a['name']:<24}{a['class']:<20}{worker:>7}{a['mailbox']:>9}"
                f"{a['handled']:>9}  {a['state']:<9}{a['restarts']:>8}"
            )
    return EXIT_OK


def _agent_rows(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The agents of daemon ``name``, asked through a short-lived client ([] if it has
    no free client slot or is stopping)."""
    try:
        with connect(name, state_dir=args.state_dir) as client:
            return client.agents(timeout=5.0)
    except (AstraError, TimeoutError, OSError):
        return []


def _audit(args: argparse.Namespace) -> int:
    """Reads the audit log from the daemon's data dir (it need not be running)."""
    root = args.state_dir or default_state_dir()
    entries = read_audit(os.path.join(root, args.name), tail=args.tail)
    if args.json:
        print(json.dumps([msgspec.structs.asdict(e) for e in entries]))
        return EXIT_OK
    print(f"{'time':<20}{'agent':<20}{'tool':<14}{'outcome':<20}{'seconds':>8}{'rss KiB':>9}")
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.time))
        print(
            f"{when:<20}{(e.agent or '-')[:19]:<20}{e.tool[:13]:<14}{e.outcome[:19]:<20}"
            f"{e.duration_s:>8.3f}{e.peak_rss_kb:>9}"
        )
    return EXIT_OK


def _plugins(args: argparse.Namespace) -> int:
    """Reads the plugins' status from the daemon's data dir (its last run if it is not
    running): one row per plugin, then every failure reported by any of its processes."""
    root = args.state_dir or default_state_dir()
    rows = read_plugins(os.path.join(root, args.name))
    if args.json:
        print(json.dumps([msgspec.structs.asdict(r) for r in rows]))
        return EXIT_OK
    print(f"{'plugin':<16}{'state':<10}{'services':>9}{'tools':>6}{'events':>7}  source")
    for r in rows:
        print(
            f"{r.name[:15]:<16}{r.state:<10}{len(r.services):>9}{len(r.tools):>6}"
            f"{len(r.events):>7}  {r.source} ({r.spec})"
        )
        if r.supervisor_services:
            print(f"    in the supervisor: {', '.join(r.supervisor_services)}")
        if r.error:
            print(f"    error: {r.error}")
        for failure in r.failures:
            print(f"    failed in {failure}")
    return EXIT_OK


def _kill(args: argparse.Namespace) -> int:
    if _live_state(args) is None:
        return EXIT_UNAVAILABLE
    try:
        with connect(args.name, state_dir=args.state_dir) as client:
            client.kill(args.agent)
    except AgentNotFoundError:
        print(f"astra: no agent named {args.agent!r}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except (AstraError, TimeoutError) as exc:
        print(f"astra: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if not args.json:
        print(f"killed {args.agent}")
    return EXIT_OK


def _stop(args: argparse.Namespace) -> int:
    state = _live_state(args)
    if state is None:
        return EXIT_UNAVAILABLE
    try:
        proc = psutil.Process(state.pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(args.timeout)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        print(f"astra: astrad {args.name!r} did not stop in {args.timeout} s", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if args.json:
        print(json.dumps({"name": args.name, "pid": state.pid, "stopped": True}))
    else:
        print(f"astrad {args.name!r} (pid {state.pid}) stopped")
    return EXIT_OK


# ---- astrad ----


def _astrad_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="astrad",
        description="The Astra supervisor daemon. Settings: flag > ASTRA_* env > file > default.",
    )
    parser.add_argument("--version", action="version", version=f"astrad {__version__}")
    parser.add_argument(
        "--config", default=None, help=f"config file (default: {DEFAULT_CONFIG_PATH})"
    )
    parser.add_argument(
        "--check-config", action="store_true", help="validate, print the effective config, exit"
    )
    parser.add_argument("--workers", type=int, default=None, help="default: one per core")
    parser.add_argument("--name", default=None, help="instance name (one astrad per name)")
    parser.add_argument("--state-dir", default=None, help=f"default: {default_state_dir()}")
    parser.add_argument("--max-clients", type=int, default=None)
    parser.add_argument("--log-level", default=None, help="debug, info, warning or error")
    parser.add_argument("--log-format", default=None, help="text (default) or json")
    parser.add_argument("--metrics-addr", default=None, help="serve /metrics on HOST:PORT")
    parser.add_argument(
        "--plugin", dest="plugins", action="append", default=None, metavar="PKG.MOD:CLASS",
        help="load this plugin too (repeatable; entry points of 'astra.plugins' always load)",
    )  # fmt: skip
    return parser


def astrad_main(argv: list[str] | None = None) -> int:
    """Entry point of ``astrad``. Returns the process exit code."""
    args = _astrad_parser().parse_args(argv)
    flags = {key: getattr(args, key) for key in config_keys() if hasattr(args, key)}
    try:
        config, sources = load_config(args.config, flags=flags)
    except ConfigError as exc:
        print(f"astrad: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        print(format_config(config, sources), end="")
        return EXIT_OK
    try:
        notifier = Notifier.from_environment()
    except ValueError as exc:
        print(f"astrad: bad systemd environment: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(config.log_level, config.log_format)

    requested = [(spec, sources["plugins"]) for spec in config.plugins]
    try:
        return run_daemon(
            config.name,
            workers=config.workers or None,
            state_dir=config.state_dir or None,
            max_clients=config.max_clients,
            policy=RestartPolicy(
                max_restarts=config.max_restarts,
                within_s=config.restart_within_s,
                shutdown_timeout_s=config.shutdown_timeout_s,
            ),
            notifier=notifier,
            config=config,  # SIGHUP re-reads and applies what can change live (kernel/daemon.py)
            reload_config=lambda: load_config(args.config, flags=flags)[0],
            metrics_addr=config.metrics_addr,
            plugins=discover(BUILTIN_PLUGINS, requested),
        )
    except InstanceExistsError as exc:
        print(f"astrad: {exc}", file=sys.stderr)
        return EXIT_TEMPFAIL
    except OSError as exc:  # the state directory, the metrics address...
        print(f"astrad: {exc}", file=sys.stderr)
        return EXIT_OSERR
    finally:
        notifier.close()


if __name__ == "__main__":
    sys.exit(main())
