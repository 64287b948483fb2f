"""The dashboard's web server: one page, its static files and ``GET /api/state``, on Starlette
served by uvicorn, in a thread beside a simulation or in the foreground.

On a loopback address it needs no login, but it answers only requests whose ``Host`` is that
address (a web page elsewhere cannot reach it through DNS rebinding). Any other address needs a
token: ``Authorization: Bearer <token>``, or ``?token=`` on the page's URL, which the page then
sends with every request. The charting library (uPlot, MIT) is vendored in ``static/``: nothing
is fetched from the internet, by the server or the page.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from fededge.dashboard.state import DashboardError, Source, snapshot

STATIC = Path(__file__).with_name("static")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def required_token(host: str, token: str | None) -> str | None:
    """The token ``host`` needs: none on loopback (unless one is given), else the given one
    or a fresh random one."""
    if token or is_loopback(host):
        return token or None
    return secrets.token_urlsafe(16)


class _TokenGate:
    """Every request but the vendored static files must carry the token."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app, self.token = app, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith("/static/"):
            request = Request(scope)
            given = request.query_params.get("token") or \
                request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not secrets.compare_digest(given.encode(), self.token.encode()):
                response = PlainTextResponse(
                    "this dashboard needs its token: open the URL `fededge dashboard` printed "
                    "(…/?token=…)", status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(source: Source, *, host: str, token: str | None) -> Starlette:
    """The ASGI app for ``source``; ``token`` None only on a loopback ``host``."""

    def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    def state(request: Request) -> Response:
        return JSONResponse(snapshot(source), headers={"Cache-Control": "no-store"})

    names = {f"[{host}]" if ":" in host else host, "localhost", "127.0.0.1", "[::1]"}
    middleware = [Middleware(_TokenGate, token=token)] if token else [
        Middleware(TrustedHostMiddleware, allowed_hosts=sorted(names))]
    return Starlette(routes=[Route("/", page), Route("/api/state", state),
                             Mount("/static", StaticFiles(directory=STATIC), name="static")],
                     middleware=middleware)


@dataclass
class Address:
    host: str
    port: int
    token: str | None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/" + (f"?token={self.token}" if self.token else "")


class DashboardServer:
    """Serves ``source`` on ``host:port`` (0: a free port). The socket is bound here, so a port
    in use fails at once with a clear error, before any other work."""

    def __init__(self, source: Source, *, host: str = "127.0.0.1", port: int = 0,
                 token: str | None = None) -> None:
        token = required_token(host, token)
        self._socket = _bind(host, port)
        self.address = Address(host, self._socket.getsockname()[1], token)
        config = uvicorn.Config(build_app(source, host=host, token=token), log_level="warning",
                                access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.address.url

    def serve_forever(self) -> None:
        """Serve in this thread until Ctrl-C (uvicorn re-raises it after shutting down)."""
        self._server.run(sockets=[self._socket])

    def start(self) -> DashboardServer:
        """Serve in a background thread; ``stop()`` ends it."""
        self._thread = threading.Thread(target=self._server.run,
                                        kwargs={"sockets": [self._socket]}, name="dashboard",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._socket.close()

    def __enter__(self) -> DashboardServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _bind(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise DashboardError(f"--port {port}: pass 0 (any free port) up to 65535")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family, backlog=64)
    except OSError as exc:
        raise DashboardError(f"cannot serve the dashboard on {host}:{port} "
                             f"({exc.strerror or exc}); pass another --port, or --host "
                             "127.0.0.1") from None
