"""`astra service install` refuses an astrad the service could not run (under a home tree
that the unit's ProtectHome=yes hides, or started by an interpreter there)."""

from __future__ import annotations

import pytest

import astra._service as service
from astra._service import UNIT_NAME, install_unit


@pytest.fixture
def hidden(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setattr(service, "HIDDEN_TREES", (str(home),))
    return home


def _script(path, interpreter: str) -> str:
    path.write_text(f"#!{interpreter}\nprint('astrad')\n")
    path.chmod(0o755)
    return str(path)


def test_an_astrad_under_a_hidden_tree_is_refused(tmp_path, hidden):
    astrad = _script(hidden / "astrad", "/usr/bin/python3")
    with pytest.raises(ValueError, match=r"ProtectHome=yes hides.*python3 -m venv /opt/astra"):
        install_unit(str(tmp_path / "units"), astrad=astrad)
    assert not (tmp_path / "units" / UNIT_NAME).exists()


def test_an_astrad_whose_interpreter_is_under_a_hidden_tree_is_refused(tmp_path, hidden):
    astrad = _script(tmp_path / "astrad", str(hidden / "venv" / "bin" / "python"))
    with pytest.raises(ValueError, match=r"venv/bin/python is under"):
        install_unit(str(tmp_path / "units"), astrad=astrad)


def test_an_astrad_in_a_system_location_is_written(tmp_path, hidden):
    astrad = _script(tmp_path / "astrad", "/usr/bin/python3")
    path = install_unit(str(tmp_path / "units"), astrad=astrad)
    with open(path) as f:
        assert f"ExecStart={astrad}" in f.read()
