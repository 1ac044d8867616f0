"""astrad's configuration: one typed record, four sources, one precedence.

    flag (--workers 8)  >  environment (ASTRA_WORKERS=8)  >  file (/etc/astra/astrad.toml)
                        >  default

Every key exists in all four forms: ``state_dir`` is ``--state-dir``, ``ASTRA_STATE_DIR`` and
``state_dir = "..."`` in the file. ``load_config`` validates each value where it comes from,
so an error names the key *and* its source ("ASTRA_WORKERS: expected an integer >= 0, got
'many'"), and it returns a complete ``Config`` or raises ``ConfigError``: astrad never starts
half-configured. An unknown key in the file is an error (a typo must not silently fall back
to a default); unknown ``ASTRA_*`` variables are not, because other modules read their own
(``ASTRA_RING_SPIN_US``...).

Reload (SIGHUP, kernel/daemon.py): the daemon re-reads all four sources. A bad value is
reported (the key and its source) and the running configuration stays, whole. Otherwise
``apply_reload`` takes the ``RELOADABLE`` keys from the new config, and the daemon applies
them at once: the restart policy and drain timeout in the supervisor, the log level and
format in the supervisor and, through kernel/logs.py's shared word, in every worker before
its next line. Any other key needs a restart: the reload names it and keeps the running
value, and the config the next reload compares against is the one now running.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "RELOADABLE",
    "Config",
    "ConfigError",
    "apply_reload",
    "config_keys",
    "format_config",
    "load_config",
]

import os
import tomllib
from typing import TYPE_CHECKING, Annotated, Final, Literal

import msgspec

from .errors import KernelError

if TYPE_CHECKING:
    from collections.abc import Mapping

#: Where astrad looks for its file unless ``--config``/``ASTRA_CONFIG`` says otherwise. A
#: missing default file is fine (defaults apply); a missing file that was named is an error.
DEFAULT_CONFIG_PATH: Final = "/etc/astra/astrad.toml"
_ENV_PREFIX: Final = "ASTRA_"
#: Keys whose command-line flag is not ``--`` + the key (``--plugin`` repeats, one each).
_FLAGS: Final = {"plugins": "--plugin"}


class ConfigError(KernelError):
    """Raised by ``load_config`` for an unknown key, a bad value or an unreadable file; the
    message names the key and where its value came from, and ``key`` is that key (None for
    an unreadable or malformed file)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, str | None]]:
        return (type(self), (str(self), self.key))


class Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The effective configuration of one astrad."""

    #: Instance name: one astrad per name; clients ``astra.connect(name)``.
    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_]{1,32}$")] = "default"
    #: Worker processes; 0 means one per core.
    workers: Annotated[int, msgspec.Meta(ge=0, le=4096)] = 0
    #: Where the daemon keeps its state file, journal and memory (LMDB). Empty: the
    #: daemon's default ($XDG_RUNTIME_DIR/astra, or ~/.astra; systemd's StateDirectory).
    state_dir: str = ""
    #: Client slots in the shared control block.
    max_clients: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 16
    #: Worker restarts allowed within ``restart_within_s`` before astrad gives up (OTP).
    max_restarts: Annotated[int, msgspec.Meta(ge=0)] = 10
    restart_within_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    #: How long a drain may take on SIGTERM before the remaining workers are SIGKILLed.
    shutdown_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    #: ``HOST:PORT`` to serve Prometheus ``/metrics`` on; empty: no HTTP listener.
    metrics_addr: Annotated[
        str, msgspec.Meta(pattern=r"^(|[^\s:]+:\d{1,5}|\[[0-9a-fA-F:]+\]:\d{1,5})$")
    ] = ""
    #: Group that may attach (segments and state created 0660 with it); empty: owner only.
    group: str = ""
    #: Plugins to load, as ``package.module:Class``, beside those found by entry point.
    plugins: tuple[str, ...] = ()


#: Keys a SIGHUP reload applies to the running daemon.
RELOADABLE: Final = frozenset({"log_level", "log_format", "max_restarts", "restart_within_s",
                               "shutdown_timeout_s"})  # fmt: skip


def config_keys() -> tuple[str, ...]:
    """Every key, in declaration order."""
    return Config.__struct_fields__


def load_config(
    path: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, object] | None = None,
) -> tuple[Config, dict[str, str]]:
    """Merge the four sources and validate. Returns the config and, per key, where its value
    came from (``"default"``, ``"file /etc/..."``, ``"env ASTRA_X"``, ``"flag --x"``).

    Args:
        path: the file; None means ``$ASTRA_CONFIG`` or else ``DEFAULT_CONFIG_PATH`` (and a
            missing default file is skipped).
        environ: the environment (default ``os.environ``).
        flags: command-line values that were given (leave out flags not given, or pass None
            for them).

    Raises:
        ConfigError: an unreadable or malformed file, an unknown file key, a bad value.
    """
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    sources = dict.fromkeys(config_keys(), "default")
    types = {f.name: f.type for f in msgspec.structs.fields(Config)}

    def take(key: str, value: object, source: str, *, strict: bool) -> None:
        if key not in types:
            known = ", ".join(types)
            raise ConfigError(f"{source}: unknown key {key!r} (known: {known})", key)
        try:
            values[key] = msgspec.convert(value, types[key], strict=strict)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{source}: bad value {value!r} for {key!r}: {exc}", key) from None
        sources[key] = source

    file_path, named = _file_path(path, env)
    for key, value in _read_file(file_path, named).items():
        take(key, value, f"file {file_path} key {key!r}", strict=True)
    for key in types:
        var = _ENV_PREFIX + key.upper()
        if var in env:
            raw: object = env[var]
            if types[key] == tuple[str, ...]:
                raw = [p for p in env[var].replace(",", " ").split() if p]
            take(key, raw, f"env {var}", strict=False)
    for key, value in (flags or {}).items():
        if value is not None:
            take(key, value, f"flag {_FLAGS.get(key, '--' + key.replace('_', '-'))}", strict=True)
    return Config(**values), sources  # type: ignore[arg-type]


def apply_reload(running: Config, new: Config) -> tuple[Config, list[str], list[str]]:
    """What a reload does with a freshly loaded ``new`` config: returns the config to run
    with from now on (``running`` with ``new``'s ``RELOADABLE`` values), the changed keys
    applied live, and the changed keys that keep their running value until a restart."""
    changed = [k for k in config_keys() if getattr(new, k) != getattr(running, k)]
    live = [k for k in changed if k in RELOADABLE]
    later = [k for k in changed if k not in RELOADABLE]
    return msgspec.structs.replace(running, **{k: getattr(new, k) for k in live}), live, later


def _file_path(path: str | None, env: Mapping[str, str]) -> tuple[str, bool]:
    if path is not None:
        return path, True
    if env.get("ASTRA_CONFIG"):
        return env["ASTRA_CONFIG"], True
    return DEFAULT_CONFIG_PATH, False


def _read_file(path: str, named: bool) -> dict[str, object]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        if named:
            raise ConfigError(f"config file {path} does not exist") from None
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None


def format_config(config: Config, sources: Mapping[str, str] | None = None) -> str:
    """The config as TOML that ``load_config`` reads back, each line commented with its
    source (for ``astrad --check-config``)."""
    lines = []
    for key in config_keys():
        value = getattr(config, key)
        text = _toml_value(value)
        note = f"  # {sources[key]}" if sources else ""
        lines.append(f"{key} = {text}{note}")
    return "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return msgspec.json.encode(str(value)).decode()  # a JSON string is a TOML basic string
