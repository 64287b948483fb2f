"""The files provisioning renders from fededge/kits/templates/*.in: the renderer's rules, and that
no setting can add a line (a directive) to mosquitto.conf, a start script or a systemd unit."""

from __future__ import annotations

import pytest
from kit_helpers import EXAMPLE

from fededge.config import FederationConfig
from fededge.kits import mosquitto as mq
from fededge.kits.fedfile import FederationFileError
from fededge.kits.provision import provision
from fededge.kits.render import TemplateError, render, when

START_FLAGS = dict(wheel="fededge-0.1.0-py3-none-any.whl", if_trains=when(True),
                   if_not_trains=when(False), if_device=when(True))


def test_optional_lines_comments_and_shell_text():
    unit = render("fededge.service.in", role="agent", what="device 'd'", federation="demo",
                  user="fededge", kit="/etc/fededge/agent", state_dir="state", threads=None,
                  if_broker=when(False), if_not_broker=when(True), if_agent=when(True),
                  if_not_agent=when(False), if_state=when(False), if_not_state=when(True),
                  wheel="fededge-0.1.0-py3-none-any.whl", if_train=when(False),
                  if_not_train=when(True))
    assert "OMP_NUM_THREADS" not in unit and "ExecReload" not in unit  # None: line left out
    assert "ExecStart=/opt/fededge/bin/fededge agent --kit /etc/fededge/agent\n" in unit
    assert "ReadWritePaths=/etc/fededge/agent/state\n" in unit
    assert "@" not in unit and "Rendered by" not in unit  # template comments stay behind
    start = render("start.sh.in", role="client", what="device 'd'", federation="demo",
                   **START_FLAGS)
    assert start.startswith("#!/bin/sh\n")
    assert '"fededge-0.1.0-py3-none-any.whl[train]"' in start and "install.sh" in start
    assert start.endswith('exec "${FEDEDGE:-fededge}" client --kit "$KIT" "$@"\n')


def test_every_placeholder_needs_a_value_and_every_value_a_placeholder():
    with pytest.raises(TypeError, match=r"missing values \['role'\]"):
        render("start.sh.in", what="x", federation="demo", **START_FLAGS)
    with pytest.raises(TypeError, match=r"unknown values \['rol'\]"):
        render("start.sh.in", role="client", rol="client", what="x", federation="demo",
               **START_FLAGS)


@pytest.mark.parametrize("value", ["demo\nExecStartPre=/bin/rm -rf /", "demo\r", "a\x00b"])
def test_a_value_cannot_add_a_line(value):
    with pytest.raises(TemplateError, match="must be one line of printable characters"):
        render("start.sh.in", role="client", what=value, federation="demo", **START_FLAGS)


def test_a_unit_value_cannot_hold_a_systemd_specifier():
    values = dict(role="client", what="device 'd' (profile 50%)", federation="demo",
                  user="fededge", kit="/etc/fededge/client", state_dir="state", threads=4,
                  if_broker=None, if_not_broker="", if_agent=None, if_not_agent="",
                  if_state="", if_not_state=None, wheel="w.whl", if_train="",
                  if_not_train=None)
    with pytest.raises(TemplateError, match="systemd expands % specifiers"):
        render("fededge.service.in", **values)


def test_conf_settings_are_one_token_each():
    config = FederationConfig()
    for bad in ({"bind": "0.0.0.0\nallow_anonymous true"}, {"user": "mosquitto root"}):
        settings = {"bind": "0.0.0.0", "user": "mosquitto", **bad}
        with pytest.raises(ValueError, match=f"{next(iter(bad))} .* is no"):
            mq.ConfSettings(config, settings["bind"], 8883, 0, 3, user=settings["user"])
    assert mq.ConfSettings(config, "::", 8883, 0, 3, user="mqtt").bind == "::"


@pytest.mark.parametrize("old, new, words", [
    ('bind = "127.0.0.1"', 'bind = "127.0.0.1\\nallow_anonymous true"',
     r"\[broker\] bind: must be an IP address or a host name"),
    ('# user = "mosquitto"', 'user = "mosquitto\\nallow_anonymous true"',
     r"\[broker\] user: must be a system user name"),
])
def test_broker_settings_written_into_the_conf_are_checked(tmp_path, old, new, words):
    text = EXAMPLE.read_text()
    assert old in text
    path = tmp_path / "federation.toml"
    path.write_text(text.replace(old, new))
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1)
                if text.startswith(new.split(" = ")[0] + " = "))
    with pytest.raises(FederationFileError, match=f"line {line}: {words}"):
        provision(path, tmp_path / "kits")
    assert not (tmp_path / "kits").exists()
