"""The edge agent's local HTTP endpoint, for other programs on the device (standard library).

    GET  /health    200 {"device", "version", "previous", "providers", "broker"}; 503 while
                    nothing serves. ``broker`` is {"connected", "since", "problem"}: the model
                    serves whether or not the broker is reachable.
    POST /predict   {"x": [[...], ...]} raw features, a batch shaped like the model's input
                    → 200 {"version", "labels", "classes", "confidences"}

Errors are JSON ``{"error": "..."}`` with 400 (bad request), 404, 413 (body over
``MAX_BODY_BYTES``) or 503 (no model installed yet). It binds to 127.0.0.1 unless told
otherwise: there is no authentication, so it is meant for the device itself. Requests read the
agent's served model at the time they arrive, so an install or rollback never interrupts one.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import numpy as np

from fededge.edge.runtime import InferenceError
from fededge.wire import boundedjson

if TYPE_CHECKING:
    from fededge.edge.agent import Agent

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024 * 1024


def serve(agent: Agent, host: str, port: int) -> ThreadingHTTPServer:
    """Start serving ``agent.served`` (and ``agent.report()`` for health) in a daemon thread;
    ``port`` 0 picks a free one (see ``server.server_address``). Stop with ``shutdown()``."""
    server = ThreadingHTTPServer((host, port), _handler(agent))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="agent-http", daemon=True).start()
    return server


def _handler(agent: Agent) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "fededge-agent"

        def do_GET(self) -> None:
            if self.path != "/health":
                return self._send(404, {"error": f"no such path {self.path}; use GET /health "
                                                 "or POST /predict"})
            report = agent.report()
            served = agent.served
            self._send(200 if served else 503, {
                "device": report["device"], "version": served.version if served else None,
                "previous": report["previous"], "providers": report["providers"],
                "broker": agent.broker_state()})

        def do_POST(self) -> None:
            if self.path != "/predict":
                return self._send(404, {"error": f"no such path {self.path}; use POST /predict"})
            served = agent.served
            if served is None:
                return self._send(503, {"error": "no model installed yet; deploy one with "
                                                 "`fededge deploy`"})
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                return self._send(400, {"error": "Content-Length is not a number"})
            if not 0 <= length <= MAX_BODY_BYTES:
                return self._send(413, {"error": f"body of {length} bytes exceeds "
                                                 f"{MAX_BODY_BYTES}; send smaller batches"})
            try:
                body = boundedjson.loads(self.rfile.read(length), max_depth=8,
                                         max_items=MAX_BODY_BYTES)
                X = np.asarray(body["x"], dtype=np.float32)
                labels, confidences = served.model.predict(X)
            except (ValueError, TypeError, KeyError, InferenceError) as exc:
                return self._send(400, {"error": _bad_request(exc, served.model.sample_shape)})
            names = served.model.class_names
            self._send(200, {"version": served.version, "labels": labels.tolist(),
                             "classes": [names[i] for i in labels],
                             "confidences": confidences.tolist()})

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib name)
            log.debug("http %s: " + format, self.client_address[0], *args)

    return Handler


def _bad_request(exc: Exception, sample_shape: tuple[int, ...]) -> str:
    if isinstance(exc, InferenceError):
        return str(exc)
    shape = ", ".join(map(str, sample_shape))
    return (f"expected a JSON body {{\"x\": [...]}} with numbers shaped (N, {shape}); "
            f"got {type(exc).__name__}: {exc}")
