"""The README is the user's reference: every option of every command is listed in its
Commands section (on the command's own lines), and its Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import click
import numpy as np
import pytest
import typer.main

from fededge.cli.app import app

README = Path(__file__).resolve().parent.parent / "README.md"


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def _command_blocks() -> dict[str, str]:
    """``fededge NAME ...`` lines of the Commands section with their indented continuations."""
    block = re.search(r"```sh\n(.*?)```", _section("Commands"), re.S).group(1)
    blocks: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        match = re.match(r"fededge ([a-z-]+)", line)
        if match and not match.group(1).startswith("-"):
            current = match.group(1)
            blocks[current] = blocks.get(current, "") + line + "\n"
        elif line.startswith(" ") and current:
            blocks[current] += line + "\n"
        else:
            current = None
    return blocks


def _options(command) -> list[str]:
    return [opt for param in command.params if param.param_type_name == "option"
            for opt in param.opts + param.secondary_opts if opt != "--help"]


def _listed(option: str, text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def test_every_command_and_option_is_in_the_readme():
    group = typer.main.get_command(app)
    ctx = click.Context(group)
    blocks = _command_blocks()
    missing = [opt for opt in _options(group) if not _listed(opt, _section("Commands"))]
    for name in group.list_commands(ctx):
        if name not in blocks:
            missing.append(f"the command {name}")
            continue
        missing += [f"{name} {opt}" for opt in _options(group.get_command(ctx, name))
                    if not _listed(opt, blocks[name])]
    assert not missing, f"README.md's Commands section lacks: {', '.join(missing)}"


def test_the_checker_sees_a_missing_option():
    assert _listed("--baselines", "[--baselines/--no-baselines]")
    assert not _listed("--baselines", "[--no-baselines]")
    assert not _listed("--out", "[--output DIR]")


def test_environment_variables_and_data_keys_are_documented():
    text = README.read_text()
    for name in ("FEDEDGE_DEVICES", "FEDEDGE_DASHBOARD_TOKEN", "class_names", "X_public"):
        assert name in text, name


@pytest.mark.slow
def test_the_python_example_runs(tmp_path, monkeypatch, capsys):
    code = re.search(r"```python\n(.*?)```", _section("From Python"), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md (From Python)", "exec"), namespace)
    run = namespace["run"]
    assert run.summary["rounds"] == 2 and [r.round for r in run.rows] == [0, 1, 2]
    assert (tmp_path / "runs/notebook/summary.json").is_file()
    assert (tmp_path / "runs/notebook/data.npz").is_file()  # the arrays, for a resume
    labels = namespace["labels"]
    assert labels.shape == (5,) and np.array_equal(labels, namespace["model"].predict(
        namespace["X"][:5])[0])
    assert namespace["device"] in capsys.readouterr().out
