"""Print the pip requirements of one fededge install mode, read from fededge's own metadata.

Why this exists: fededge's base dependencies are the torch-free edge runtime and agent, its
``train`` extra adds torch and the rest of the training side. ``devices/install.sh`` installs
fededge itself with ``pip install --no-deps`` and then exactly the requirements printed here
(``base`` for an agent-only device, ``base,train`` for a training client), so it can install
torch first from the index it chooses and leave onnxruntime out where a Jetson gets NVIDIA's
onnxruntime-gpu wheel instead. Reading them from the package (a wheel's METADATA, the
installed distribution, or a checkout's pyproject.toml) keeps pyproject.toml the only list.

Standard library only and Python 3.8+ (JetPack 5's python3), because it runs before fededge
and its dependencies exist.

    python3 requirements.py SOURCE GROUP [--only NAME] [--without NAME ...]

SOURCE is a pyproject.toml, a .whl, or ``installed`` (fededge in this interpreter); GROUP is
``base``, an extra's name (``train``) or several joined by commas (``base,train``). Environment markers other than the extra are kept for
pip to evaluate on the device.
"""

from __future__ import annotations

import argparse
import re
import sys
import zipfile
from pathlib import Path

DIST = "fededge"
NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
EXTRA = re.compile(r"""extra\s*==\s*['"]([^'"]+)['"]""")


class RequirementsError(ValueError):
    """A source this script cannot read; the message says what to pass instead."""


def normalize(name: str) -> str:
    """PEP 503 name: 'Paho_MQTT' and 'paho-mqtt' are the same project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def split_extra(requirement: str) -> tuple[str, str | None]:
    """'typer>=0.12; extra == "edge"' → ('typer>=0.12', 'edge'); other markers stay."""
    spec, _, marker = requirement.partition(";")
    found = EXTRA.findall(marker)
    if not found:
        return requirement.strip(), None
    if len(found) > 1 or re.search(r"\bor\b", marker):
        raise RequirementsError(f"cannot split the extra out of marker {marker.strip()!r}; "
                                "keep extras' markers to 'extra == NAME [and ...]'")
    rest = EXTRA.sub("", marker)
    rest = re.sub(r"^\s*and\s+|\s+and\s*$", "", rest.strip()).strip()
    return (f"{spec.strip()} ; {rest}" if rest else spec.strip()), found[0]


def from_metadata_lines(lines: list[str], group: str) -> list[str]:
    """Requirements of ``group`` from Requires-Dist values (wheel METADATA or installed)."""
    picked = []
    for line in lines:
        spec, extra = split_extra(line)
        if (group == "base" and extra is None) or extra == group:
            picked.append(spec)
    return picked


def from_pyproject(path: Path, group: str) -> list[str]:
    try:
        import tomllib
    except ModuleNotFoundError:
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise RequirementsError(
                f"{path}: reading pyproject.toml needs Python 3.11+ (tomllib); pass the fededge "
                "wheel instead (pip wheel --no-deps .)") from None
    project = tomllib.loads(path.read_text())["project"]
    if group == "base":
        return list(project.get("dependencies", []))
    extras = project.get("optional-dependencies", {})
    if group not in extras:
        raise RequirementsError(f"{path}: no optional dependency group {group!r}; "
                                f"it has {', '.join(sorted(extras)) or 'none'}")
    return list(extras[group])


def from_wheel(path: Path, group: str) -> list[str]:
    with zipfile.ZipFile(path) as wheel:
        names = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
        if not names:
            raise RequirementsError(f"{path}: no *.dist-info/METADATA; is it a wheel?")
        text = wheel.read(names[0]).decode()
    header = text.split("\n\n", 1)[0]
    return from_metadata_lines([line.split(":", 1)[1].strip() for line in header.splitlines()
                                if line.startswith("Requires-Dist:")], group)


def from_installed(group: str) -> list[str]:
    from importlib import metadata

    try:
        return from_metadata_lines(metadata.requires(DIST) or [], group)
    except metadata.PackageNotFoundError:
        raise RequirementsError(f"{DIST} is not installed in {sys.executable}; "
                                "install it first (pip install --no-deps ...)") from None


def requirements(source: str, group: str) -> list[str]:
    """The requirement lines of ``group`` from ``source`` (see the module docstring); a
    comma-separated ``group`` lists each group's lines in turn."""
    if "," in group:
        return [line for part in group.split(",") for line in requirements(source, part)]
    if source == "installed":
        return from_installed(group)
    path = Path(source)
    if not path.is_file():
        raise RequirementsError(f"{source}: no such file; pass a pyproject.toml, a .whl or "
                                "'installed'")
    if path.suffix == ".whl":
        return from_wheel(path, group)
    if path.name == "pyproject.toml":
        return from_pyproject(path, group)
    raise RequirementsError(f"{source}: not a pyproject.toml or a .whl")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="pyproject.toml, a .whl, or 'installed'")
    parser.add_argument("group", help="'base', an extra's name ('train'), or several joined "
                                      "by commas ('base,train')")
    parser.add_argument("--only", help="print only this project's requirement")
    parser.add_argument("--without", action="append", default=[],
                        help="leave this project out (installed separately)")
    args = parser.parse_args(argv)
    try:
        lines = requirements(args.source, args.group)
    except (RequirementsError, OSError, KeyError, zipfile.BadZipFile) as exc:
        print(f"requirements.py: error: {exc}", file=sys.stderr)
        return 2
    without = {normalize(n) for n in args.without}
    for line in lines:
        name = normalize(NAME.match(line).group(1))
        if name in without or (args.only and name != normalize(args.only)):
            continue
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
