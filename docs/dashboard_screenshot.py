"""Take docs/dashboard.png: the dashboard of a demo-sized `fededge simulate --dashboard` run
(10 devices, 20 rounds, baselines on), shot by headless Chromium once half the rounds are
done. Run by `make screenshot`; needs the Debian package chromium.

    python docs/dashboard_screenshot.py docs/dashboard.png
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from fededge.transport.brokers import free_port, wait_for_port


def main(target: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("chromium is missing: sudo apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        sim = subprocess.Popen([sys.executable, "-m", "fededge.cli", "-q", "simulate",
                                "--dashboard", str(port), "--out", f"{tmp}/run"],
                               stdout=subprocess.DEVNULL)
        try:
            if not wait_for_port("127.0.0.1", port, 120):
                sys.exit("the dashboard did not come up")
            while True:
                with urllib.request.urlopen(url + "api/state", timeout=10) as response:
                    state = json.load(response)
                progress = state["progress"] or {}
                if progress.get("completed", 0) >= progress.get("rounds", 99) // 2:
                    break
                if sim.poll() is not None:
                    sys.exit("the simulation ended before the screenshot")
                time.sleep(1)
            subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                            "--disable-quic", "--no-first-run", "--disable-background-networking",
                            "--disable-component-update", "--disable-sync",
                            f"--user-data-dir={tmp}/chromium", "--hide-scrollbars",
                            "--window-size=1280,1000", "--virtual-time-budget=4000",
                            f"--screenshot={target.resolve()}", url],
                           check=True, capture_output=True)
        finally:
            sim.kill()
            sim.wait()
    print(f"wrote {target}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/dashboard.png"))
