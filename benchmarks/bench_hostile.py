"""Issue 17's target: a kit federation (TLS Mosquitto, three honest `fededge client`
processes) with and without a hostile provisioned device publishing the four killer payloads,
retained. Prints rounds finished, rejections and the honest devices' final accuracy for both.

    .venv/bin/python benchmarks/bench_hostile.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import killers  # noqa: E402


def main() -> None:
    results = {}
    for attack in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            results["hostile" if attack else "clean"] = killers.kit_federation(
                Path(tmp), attack=attack)
    for name, r in results.items():
        accs = r["accuracy"]
        print(f"{name}: {r['rounds']} rounds, {r['accepted']} uploads accepted, "
              f"{r['rejected']} rejected, {len(r['sent'])} hostile payloads sent; final "
              f"accuracy " + ", ".join(f"{d} {100 * a:.1f}%" for d, a in accs.items())
              + f"; mean {100 * sum(accs.values()) / len(accs):.1f}%")
    out = Path(__file__).parent / "results" / "hostile.json"
    out.write_text(json.dumps({k: {**v, "reasons": sorted(set(v["reasons"]))}
                               for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
