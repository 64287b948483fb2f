"""FedDF: fedmd rounds, with a server model distilled from each consensus as the teacher."""

from __future__ import annotations

from fededge.config import ConfigError, FederationConfig
from fededge.federation.strategies.base import PHASE_LOGITS, Learner, Reply, teacher_name
from fededge.federation.strategies.fedmd import FedMDServer, announced_rows
from fededge.wire.messages import Payload


class FedDFServer(FedMDServer):
    """A FedDF-style server teacher (Lin et al., 2020): the server distills each round's
    consensus into its own, larger model (``config.teacher``, by default the largest student of
    the zoo) on the announced proxy rows, and that model's predictions become the teacher signal.

    One model carries knowledge across rounds and smooths the consensus over similar proxy
    samples; it costs the server ``server_epochs`` of training per round and needs torch and the
    proxy set at the server. Devices run the fedmd client unchanged. A restarted server starts
    its model afresh from the seed (the store keeps consensus, not this model).
    """

    name = "feddf"
    needs_proxy = True

    def __init__(self, config: FederationConfig, **resources) -> None:
        super().__init__(config, **resources)
        if self.public_X is not None and len(self.public_X) != config.proxy_size:
            raise ConfigError(f"feddf got a proxy set of {len(self.public_X)} rows, the config "
                              f"says {config.proxy_size}; derive both from the same split")
        self._server: Learner | None = None

    def aggregate(self, rnd: int, announcement: Payload, replies: list[Reply]) -> Payload:
        if self.public_X is None or self.new_learner is None:
            raise ConfigError("strategy feddf needs the proxy set and torch at the server (it "
                              "trains a server model); run it with `fededge simulate` or a "
                              "server kit whose dataset the server can load")
        rows = self.public_X[announced_rows(announcement, self.config.proxy_size)]
        c = self.config
        if self._server is None:
            self._server = self.new_learner(teacher_name(c), c.seed)
        self._server.distill(rows, self.consensus(replies), epochs=c.server_epochs,
                             temperature=c.temperature, alpha=1.0)
        return Payload(info={"phase": PHASE_LOGITS, "contributors": len(replies),
                             "server_model": teacher_name(c)},
                       tensors=self.codec.encode(self._server.logits(rows)))
