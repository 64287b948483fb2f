"""FedMD / DS-FL: logits on proxy rows up, their consensus down, distilled by every device."""

from __future__ import annotations

import logging

import numpy as np

from fededge.config import FederationConfig
from fededge.federation.strategies.base import (
    PHASE_LOGITS,
    ClientContext,
    ClientStrategy,
    Reply,
    ServerStrategy,
)
from fededge.learn.aggregate import SHARPENED_AGGREGATORS, get_aggregator
from fededge.learn.anchor import LabelAnchor
from fededge.learn.privacy import LocalPrivacy
from fededge.wire.codecs import codec_for
from fededge.wire.envelope import Message, TensorSpec, require_tensors
from fededge.wire.messages import Payload, decode_rows, encode_rows
from fededge.wire.topics import ProtocolError

log = logging.getLogger(__name__)


def _round_rng(config: FederationConfig, rnd: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, rnd, 0xFED])


def announced_rows(announcement: Payload, proxy_size: int) -> np.ndarray:
    """The proxy-set rows a ``logits`` announcement selects, in order."""
    return decode_rows(announcement.tensors, proxy_size)


class FedMDServer(ServerStrategy):
    """FedMD / DS-FL: consensus logits on a seeded subset of the public proxy set."""

    name = "fedmd"

    def __init__(self, config: FederationConfig, **resources) -> None:
        super().__init__(config, **resources)
        sharpened = config.aggregator in SHARPENED_AGGREGATORS
        options = {"temperature": config.era_temperature} if sharpened else {}
        self._aggregate = get_aggregator(config.aggregator, **options)
        self.codec = codec_for(config)

    def configure(self, rnd: int) -> Payload:
        size, per_round = self.config.proxy_size, self.config.proxy_per_round
        if per_round == 0 or per_round >= size:
            rows = np.arange(size)
        else:
            rows = _round_rng(self.config, rnd).choice(size, per_round, replace=False)
        return Payload(info={"phase": PHASE_LOGITS, "temperature": self.config.temperature},
                       tensors={"rows": encode_rows(rows, size)})

    def reply_specs(self, announcement: Payload) -> list[TensorSpec]:
        specs = self.codec.specs(len(announced_rows(announcement, self.config.proxy_size)))
        if self.config.share_class_counts:
            specs.append(TensorSpec("class_counts", ("I64",), (self.config.num_classes,)))
        return specs

    def check(self, reply: Reply) -> None:
        counts = reply.payload.tensors.get("class_counts")
        if counts is not None:
            # Python ints: an int64 sum of [2**62] * 4 + ... wraps around to anything.
            values = [int(c) for c in counts.tolist()]
            if any(not 0 <= c <= reply.samples for c in values) or sum(values) != reply.samples:
                raise ProtocolError(f"class_counts do not sum to the {reply.samples} samples "
                                    f"declared, or one is negative or exceeds them: "
                                    f"{str(values)[:120]}")
        self.codec.decode(reply.payload.tensors)

    def aggregate(self, rnd: int, announcement: Payload, replies: list[Reply]) -> Payload:
        return Payload(info={"phase": PHASE_LOGITS, "contributors": len(replies)},
                       tensors=self.codec.encode(self.consensus(replies)))

    def consensus(self, replies: list[Reply]) -> np.ndarray:
        """The aggregated (rows, classes) logits of the replies, before encoding."""
        if self.config.share_class_counts:
            counts = np.stack([r.payload.tensors["class_counts"] for r in replies])
        else:
            counts = np.array([r.samples for r in replies])
        return self._aggregate([self.codec.decode(r.payload.tensors) for r in replies], counts)


class FedMDClient(ClientStrategy):
    """Upload logits on the announced proxy rows; distill the consensus, then revisit private
    data so the student does not drift from its own labels (FedMD's 'revisit' step)."""

    name = "fedmd"

    def __init__(self, config: FederationConfig) -> None:
        super().__init__(config)
        self.privacy = LocalPrivacy.from_config(config)
        self.codec = codec_for(config)

    def reply(self, ctx: ClientContext, announcement: Payload) -> Payload:
        rows = ctx.public_X[announced_rows(announcement, len(ctx.public_X))]
        logits, info = ctx.trainer.logits(rows), {}
        if self.privacy is not None:  # local DP: noised here, before anything leaves the device
            logits, info["ldp"] = self.privacy.apply(logits)
        tensors = self.codec.encode(logits)
        if self.config.share_class_counts:
            tensors["class_counts"] = np.bincount(
                ctx.private_y, minlength=self.config.num_classes).astype(np.int64)
        return Payload(info=info, tensors=tensors)

    def warmup(self, ctx: ClientContext) -> None:
        """With the safeguard on, the held-out slice is never trained on, from the warm-up on:
        a memorised slice would judge every consensus by how well the student recalls it."""
        train, _ = self._split(ctx)
        ctx.trainer.fit(ctx.private_X[train], ctx.private_y[train],
                        epochs=self.config.warmup_epochs)

    def _split(self, ctx: ClientContext) -> tuple[np.ndarray, np.ndarray | None]:
        """(train, held-out) indices of the private data; held-out None when the safeguard is
        off or there is too little data to hold any out."""
        n = len(ctx.private_y)
        if self.config.holdout_share == 0 or n < 2:
            return np.arange(n), None
        return holdout_split(n, self.config.holdout_share, self.config.seed)

    def absorb(self, ctx: ClientContext, announcement: Payload, consensus: Payload) -> None:
        rows = ctx.public_X[announced_rows(announcement, len(ctx.public_X))]
        # A consensus is checked as strictly as an upload: a hostile broker or server gets it
        # ignored (ProtocolError), never a crashed device.
        require_tensors(Message("consensus", "server", 0, {}, consensus.tensors),
                        self.codec.specs(len(rows)))
        teacher = self.codec.decode(consensus.tensors)
        X, y = ctx.private_X, ctx.private_y
        train, held = self._split(ctx)
        if held is None:
            self._learn(ctx, rows, teacher, X, y)
            return
        before, kept = ctx.trainer.accuracy(X[held], y[held]), ctx.trainer.state_dict()
        self._learn(ctx, rows, teacher, X[train], y[train])
        after = ctx.trainer.accuracy(X[held], y[held])
        if after < before - self.config.holdout_margin:
            log.info("consensus lowered held-out accuracy %.3f -> %.3f: kept the previous "
                     "student", before, after)
            ctx.trainer.load_state_dict(kept)

    def _learn(self, ctx: ClientContext, rows: np.ndarray, teacher: np.ndarray,
               X: np.ndarray, y: np.ndarray) -> None:
        """Distill the consensus (label-anchored), then revisit the labels (FedNTD)."""
        config = self.config
        anchor = (LabelAnchor(X, y, config.distill_label_weight, config.distill_label_tau,
                              config.num_classes)
                  if config.distill_label_weight > 0 else None)
        ctx.trainer.distill(rows, teacher, epochs=config.distill_epochs,
                            temperature=config.temperature, alpha=1.0, anchor=anchor)
        ctx.trainer.fit(X, y, epochs=config.revisit_epochs,
                        keep_weight=config.revisit_ntd_weight, temperature=config.temperature)


def holdout_split(n: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices of a device's private data: a fixed seeded ``share`` (at
    least one sample, never all) that judges each absorbed consensus and is never trained on
    in the rounds."""
    held = min(n - 1, max(1, round(share * n)))
    order = np.random.default_rng([seed, n, 0x40D]).permutation(n)
    return np.sort(order[held:]), np.sort(order[:held])
