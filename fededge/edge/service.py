"""The edge agent as a service: what ``fededge agent`` runs, around ``agent.Agent``.

    start        load the kit, tidy the install directory, connect, report online
    endpoint     optionally, the local HTTP endpoint (http.py) on its own thread
    run          handle deployments until the first outcome (``once``), ``timeout``, SIGTERM
                 or Ctrl-C
    stop         the endpoint, then the agent (an offline report, and the connection closed)

SIGTERM (what systemd sends to stop the unit) is turned into Ctrl-C (``KeyboardInterrupt``),
so the last step runs however the agent ends; the interruption then reaches the caller (the
command exits with status 130). The command line only parses options and prints; this module prints
nothing, it reports through ``events``. Imports no torch (the ``edge`` extra is enough).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fededge.edge.installs import Installs, Pointer
from fededge.errors import FedEdgeError
from fededge.kits.kit import load_kit

if TYPE_CHECKING:
    from fededge.edge.agent import Outcome


class EndpointError(FedEdgeError, OSError):
    """The HTTP endpoint cannot listen where it was asked to."""


def run_agent(kit: Path, *, http: int | None = None, bind: str = "127.0.0.1",
              once: bool = False, timeout: float | None = None,
              events: Callable[[str], None] = lambda line: None) -> Outcome | None:
    """Run the agent of the device kit ``kit`` until it is done; ``http``: also serve
    predictions on this port of ``bind`` (0: any free port). Returns the first outcome with
    ``once``, else None (and None if it stopped first: a timeout). Ctrl-C and SIGTERM stop it
    cleanly and are re-raised as ``KeyboardInterrupt``."""
    from fededge.edge.agent import Agent  # onnxruntime: imported to run, not to roll back
    from fededge.edge.http import serve

    agent = Agent(load_kit(kit), events=events).start()
    main = threading.current_thread() is threading.main_thread()  # signals reach only it
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if main else None
    server = None
    try:
        if http is not None:
            try:
                server = serve(agent, bind, http)
            except OSError as exc:
                raise EndpointError(f"cannot listen on {bind}:{http} ({exc.strerror}); "
                                    "choose another port") from None
            agent.http_port = server.server_address[1]
            events(f"serving http://{bind}:{agent.http_port}/predict and /health")
        served = agent.served.version if agent.served else "nothing yet"
        events(f"agent of {agent.kit.device!r} in federation {agent.kit.federation!r}: "
               f"serving {served}, waiting for deployments")
        return agent.run(once=once, timeout=timeout)
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        if server is not None:
            server.shutdown()
        agent.stop()


def install(kit: Path, export_dir: Path) -> Outcome:
    """Install the export directory ``export_dir`` on device kit ``kit`` (no broker needed);
    a running agent switches to it within a second."""
    from fededge.edge.agent import Agent

    return Agent(load_kit(kit)).install_local(export_dir)


def rollback(kit: Path) -> Pointer:
    """Serve the previously installed version of device kit ``kit`` again (a running agent
    switches within a second); returns the new install pointer."""
    load_kit(kit)
    return Installs.of_kit(kit).rollback()
