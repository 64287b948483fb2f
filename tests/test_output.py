"""Terminal output that reads well anywhere: tables at 80 columns and piped keep every name
whole, errors come first and alone, warnings show by default and -q keeps only results."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from rich.console import Console
from typer.testing import CliRunner

from fededge.cli.app import app
from fededge.cli.tables import Col, fit_table
from fededge.profiles import load_catalog


def _fededge(*args: str, columns: int | None = None) -> subprocess.CompletedProcess:
    """The command with its output piped, as in `fededge devices | cat` or a CI log."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    if columns:
        env["COLUMNS"] = str(columns)
    return subprocess.run([sys.executable, "-m", "fededge.cli", *args], capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.mark.parametrize("columns", [None, 30])
def test_devices_piped_shows_every_profile_name_whole(columns):
    proc = _fededge("devices", columns=columns)
    assert proc.returncode == 0, proc.stderr
    width = columns or 80
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= width, proc.stdout
    assert "…" not in proc.stdout
    cells = {cell.strip() for line in lines for cell in line.replace("┃", "│").split("│")}
    for name in load_catalog():
        assert name in cells, f"{name} is cut or missing at {width} columns:\n{proc.stdout}"


def test_a_table_too_wide_for_its_names_becomes_plain_lines():
    console = Console(width=24, soft_wrap=True, file=open(os.devnull, "w"))  # as fededge's
    cols = (Col("device", keep=True), Col("profile", keep=True), Col("acc", drop=1))
    rows = [("dev000-jetson-agx-orin-64gb", "jetson-agx-orin-64gb", "91.0%")]
    with console.capture() as captured:
        console.print(fit_table(console, cols, rows, title="Clients"))
    text = captured.get()
    assert "dev000-jetson-agx-orin-64gb" in text and "profile: jetson-agx-orin-64gb" in text
    assert "acc: 91.0%" in text


def test_a_table_that_fits_keeps_every_column_and_header():
    console = Console(width=200, file=open(os.devnull, "w"))
    cols = (Col("device", keep=True), Col("peak GFLOPS", "GFLOPS", drop=1))
    with console.capture() as captured:
        console.print(fit_table(console, cols, [("d", "5")]))
    assert "peak GFLOPS" in captured.get() and "left out" not in captured.get()


@pytest.mark.parametrize("args, named", [
    (["--clients", "0"], "--clients"),
    (["--set", "nonsense=1"], "nonsense"),
    (["--profiles", "pi-9"], "pi-9"),
])
def test_an_argument_error_is_the_first_and_only_line(tmp_path, args, named):
    result = CliRunner().invoke(app, ["simulate", *args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()  # stdout and stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0], lines
    assert not (tmp_path / "run").exists()


_WARN = ("from fededge.cli.output import configure_output, console, note\n"
         "import logging, sys\n"
         "configure_output(quiet='-q' in sys.argv)\n"
         "logging.getLogger('fededge.federation.server').warning('round 3 attempt 1 retrying')\n"
         "logging.getLogger('fededge.federation.server').info('round 3 open')\n"
         "logging.getLogger('amqtt.broker').warning('chatter of a library')\n"
         "note('int8 loses 2 points')\n"
         "console.print('the result')\n")


def test_warnings_show_by_default_on_stderr_and_q_keeps_only_results():
    loud = subprocess.run([sys.executable, "-c", _WARN], capture_output=True, text=True)
    assert loud.stdout.strip() == "the result"
    assert "warning: round 3 attempt 1 retrying" in loud.stderr
    assert "note: int8 loses 2 points" in loud.stderr
    assert "round 3 open" not in loud.stderr and "chatter" not in loud.stderr
    quiet = subprocess.run([sys.executable, "-c", _WARN, "-q"], capture_output=True, text=True)
    assert quiet.stdout.strip() == "the result" and quiet.stderr == ""


def test_hex_fingerprints_print_as_written(capsys):
    """rich reads ':ab:' as an emoji code; a CA fingerprint printed for users to compare must
    come out exactly as computed (it printed 07🆎94 once)."""
    from fededge.cli import output

    fingerprint = "64:A6:80:6F:07:AB:94:2F:B3:D9:F3:F9:CB:FB:C1:38:63:08:6A:B3:5B:20:10:9A"
    output.console.print(f"CA fingerprint {fingerprint}")
    output.err_console.print(f"CA fingerprint {fingerprint}")
    captured = capsys.readouterr()
    assert fingerprint in captured.out and fingerprint in captured.err
