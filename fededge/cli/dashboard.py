"""``fededge dashboard``: serve the live dashboard of a simulate run or a server kit until
Ctrl-C. Torch-free, like the server it watches (``fededge[dashboard]`` on an edge install)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fededge.cli.output import console, err_console, fail, note
from fededge.errors import FedEdgeError

TOKEN_ENV = "FEDEDGE_DASHBOARD_TOKEN"


def dashboard_cmd(
    source: Path = typer.Argument(..., help="A `fededge simulate --out` run directory (running "
                                            "or finished) or a server kit (KITS/server)."),
    port: int = typer.Option(8765, "--port", min=0, max=65535, help="Port to serve on (0: any "
                             "free port)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to serve on. Any address "
                             "but loopback requires a token."),
    token: Optional[str] = typer.Option(None, "--token", envvar=TOKEN_ENV, help="The token a "
                                        "non-loopback address requires (default: a random one, "
                                        f"printed in the URL; or ${TOKEN_ENV})."),
    state: Optional[Path] = typer.Option(None, "--state", help="A server kit's state directory, "
                                         "if its server ran with --state (default KIT/state)."),
) -> None:
    """Serve a live web page of a federation (devices, rounds, accuracy, traffic, rejections)."""
    from fededge.dashboard.server import DashboardServer
    from fededge.dashboard.state import Source
    from fededge.federation.store import Store

    try:
        where = Source.of(source, state)
        server = DashboardServer(where, host=host, port=port, token=token or None)
    except FedEdgeError as exc:
        fail(exc)
    if not Store.exists(where.store_dir):
        note(f"{where.store_dir} holds no server state yet; the page fills in once a run "
             "starts there")
    console.print(f"dashboard of {source} at {server.url} (Ctrl-C to stop)", highlight=False)
    if server.address.token and not token:
        err_console.print("a random token guards this address; the URL above carries it",
                          highlight=False)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
