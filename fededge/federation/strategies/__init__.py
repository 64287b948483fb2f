"""Strategies: what a round asks of clients and how the server combines their replies.

After Flower's Strategy: the server loop (``server.py``) and the device loop (``client.py``) are
written once, and a strategy fills in the hooks of a round:

    server  configure(rnd)                      the announcement; its ``phase`` names the round
    client  reply(ctx, announcement)            the upload
    server  reply_specs(announcement), check    exact validation of every upload
    server  aggregate(rnd, announcement, replies)   the consensus, which names its phase too
    client  absorb(ctx, announcement, consensus)    learning from it

Phases are what a device does with a round, so distillation is a phase like any other:

- ``fedmd`` (default, after FedMD / DS-FL): every round is a ``logits`` phase: logits on proxy
  rows up, consensus down, then the device distills it into its student and revisits its data.
- ``feddf``: fedmd's rounds, but the server distills each consensus into a larger server model
  whose predictions are sent as the teacher (after FedDF).
- ``fedavg``: every round is a ``weights`` phase (FedAvg): weights up, their average down.
- ``fedavg-kd`` (the design source's recipe): ``teacher`` rounds train one teacher by FedAvg
  among the devices able to train it; the last consensus opens the ``distill`` phase, in which
  every device distills that teacher into its own student on its private data, then fine-tunes.
"""

from __future__ import annotations

from fededge.errors import FedEdgeError
from fededge.federation.strategies.base import ClientStrategy, ServerStrategy
from fededge.federation.strategies.fedavg import (
    FedAvgClient,
    FedAvgKDClient,
    FedAvgKDServer,
    FedAvgServer,
)
from fededge.federation.strategies.feddf import FedDFServer
from fededge.federation.strategies.fedmd import FedMDClient, FedMDServer

STRATEGIES: dict[str, tuple[type[ServerStrategy], type[ClientStrategy]]] = {
    "fedmd": (FedMDServer, FedMDClient),
    "feddf": (FedDFServer, FedMDClient),
    "fedavg": (FedAvgServer, FedAvgClient),
    "fedavg-kd": (FedAvgKDServer, FedAvgKDClient),
}


class UnknownStrategyError(FedEdgeError, ValueError):
    pass


def strategy_pair(name: str) -> tuple[type[ServerStrategy], type[ClientStrategy]]:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise UnknownStrategyError(
            f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}") from None
