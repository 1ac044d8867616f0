"""astrad's configuration: precedence flag > env > file > default, and every error path."""

from __future__ import annotations

import pickle
import tomllib

import pytest

from kernel.config import (
    RELOADABLE,
    Config,
    ConfigError,
    apply_reload,
    config_keys,
    format_config,
    load_config,
)


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "astrad.toml"
    path.write_text(text)
    return str(path)


def test_defaults_when_nothing_is_given(tmp_path):
    cfg, sources = load_config(environ={}, flags={}, path=_write(tmp_path, ""))
    assert cfg == Config()
    assert set(sources.values()) == {"default"}


def test_a_missing_default_file_is_fine(monkeypatch):
    monkeypatch.setattr("kernel.config.DEFAULT_CONFIG_PATH", "/nonexistent/astrad.toml")
    cfg, _ = load_config(environ={})
    assert cfg == Config()


def test_precedence_flag_over_env_over_file_over_default(tmp_path):
    path = _write(tmp_path, 'workers = 2\nmax_clients = 8\nlog_level = "debug"\nname = "f"\n')
    env = {"ASTRA_WORKERS": "3", "ASTRA_MAX_CLIENTS": "9"}
    cfg, sources = load_config(path, environ=env, flags={"workers": 4, "name": None})
    assert cfg.workers == 4
    assert sources["workers"] == "flag --workers"
    assert cfg.max_clients == 9
    assert sources["max_clients"] == "env ASTRA_MAX_CLIENTS"
    assert cfg.log_level == "debug"
    assert sources["log_level"].startswith("file ")
    assert cfg.name == "f"  # a flag passed as None was not given
    assert cfg.shutdown_timeout_s == Config().shutdown_timeout_s
    assert sources["shutdown_timeout_s"] == "default"


def test_the_file_can_be_named_by_environment(tmp_path):
    path = _write(tmp_path, "workers = 5\n")
    cfg, _ = load_config(environ={"ASTRA_CONFIG": path})
    assert cfg.workers == 5


def test_env_values_are_parsed_from_text(tmp_path):
    env = {
        "ASTRA_SHUTDOWN_TIMEOUT_S": "2.5",
        "ASTRA_PLUGINS": "a.b:C, d.e:F",
        "ASTRA_METRICS_ADDR": "127.0.0.1:9464",
        "ASTRA_RING_SPIN_US": "0",  # another module's variable: not a config key, not an error
    }
    cfg, _ = load_config(_write(tmp_path, ""), environ=env)
    assert cfg.shutdown_timeout_s == 2.5
    assert cfg.plugins == ("a.b:C", "d.e:F")
    assert cfg.metrics_addr == "127.0.0.1:9464"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("wrokers = 2\n", "unknown key 'wrokers'"),
        ('workers = "two"\n', "'workers'"),
        ("workers = -1\n", "'workers'"),
        ("shutdown_timeout_s = 0\n", "'shutdown_timeout_s'"),
        ('log_level = "loud"\n', "'log_level'"),
        ('log_format = "xml"\n', "'log_format'"),
        ('metrics_addr = "nohost"\n', "'metrics_addr'"),
        ('name = "a/b"\n', "'name'"),
        ("plugins = 3\n", "'plugins'"),
        ("workers = \n", "not valid TOML"),
    ],
)
def test_bad_file_values_name_the_key_and_the_file(tmp_path, text, needle):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=needle) as err:
        load_config(path, environ={})
    assert path in str(err.value)
    # The key, for a reload's log line: None only when the file itself is bad.
    key = None if "TOML" in needle else needle.split("'")[1]
    assert err.value.key == key
    again = pickle.loads(pickle.dumps(err.value))
    assert (str(again), again.key) == (str(err.value), key)


@pytest.mark.parametrize(
    ("var", "value"),
    [("ASTRA_WORKERS", "many"), ("ASTRA_MAX_CLIENTS", "0"), ("ASTRA_LOG_LEVEL", "LOUD")],
)
def test_bad_env_values_name_the_variable(tmp_path, var, value):
    with pytest.raises(ConfigError, match=f"env {var}"):
        load_config(_write(tmp_path, ""), environ={var: value})


def test_bad_flag_values_name_the_flag(tmp_path):
    with pytest.raises(ConfigError, match="flag --max-clients"):
        load_config(_write(tmp_path, ""), environ={}, flags={"max_clients": 0})
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        load_config(_write(tmp_path, ""), environ={}, flags={"colour": "red"})


def test_a_named_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.toml"), environ={})


def test_an_unreadable_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(str(tmp_path), environ={})  # a directory


def test_formatted_config_reads_back_identically(tmp_path):
    cfg, sources = load_config(
        _write(tmp_path, 'plugins = ["x.y:Z"]\nstate_dir = "/var/lib/astra \\"q\\""\n'),
        environ={"ASTRA_WORKERS": "7"},
    )
    text = format_config(cfg, sources)
    assert "workers = 7  # env ASTRA_WORKERS" in text
    assert set(tomllib.loads(text)) == set(config_keys())
    again, _ = load_config(_write(tmp_path, text), environ={})
    assert again == cfg


def test_reload_applies_only_reloadable_keys_and_names_the_rest():
    running = Config(workers=2, max_restarts=10)
    new = Config(workers=4, max_restarts=0, log_level="debug", name="other")
    applied, live, later = apply_reload(running, new)
    assert live == ["max_restarts", "log_level"]  # declaration order
    assert later == ["name", "workers"]
    assert set(live) <= RELOADABLE
    assert applied == Config(workers=2, max_restarts=0, log_level="debug")  # the rest kept
    # The next reload compares against what now runs: the same file changes nothing live.
    assert apply_reload(applied, new)[1:] == ([], ["name", "workers"])


def test_every_reloadable_key_is_a_config_key():
    assert set(config_keys()) >= RELOADABLE
