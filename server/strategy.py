"""Aggregation of head updates: Flower's strategies, wrapped so that only screened updates reach them.

`ScreenedStrategy` wraps any Flower strategy the way Flower's own DP wrappers do
(`DifferentialPrivacyServerSideFixedClipping` wraps a strategy and adds clipping and
noise): before FedAvg/FedProx/FedAdam/FedMedian/FedTrimmedAvg sees a reply, it must carry
exactly the head's tensor names, shapes and dtypes, all finite, within the update bound;
and a round aggregates only when at least `train.min_sites` sites passed.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Strategy

from common.config import TrainConfig
from common.exchange import Spec, check_arrays
from common.protocol import Metric

SITES_IN_REPLY = "num-sites"  # metric of a reply that stands for several sites (the SecAgg+ mean)


def make_strategy(t: TrainConfig) -> Strategy:
    sampling = {
        "fraction_train": t.fraction_train,
        "fraction_evaluate": t.fraction_evaluate,
        "min_train_nodes": t.min_sites,
        "min_evaluate_nodes": t.min_sites if t.fraction_evaluate > 0 else 0,
        "min_available_nodes": t.min_sites,
    }
    if t.strategy == "fedprox":
        return FedProx(proximal_mu=t.proximal_mu, **sampling)
    if t.strategy == "fedadam":
        return FedAdam(eta=t.server_learning_rate, **sampling)
    if t.strategy == "fedmedian":  # robust: coordinate-wise median
        return FedMedian(**sampling)
    if t.strategy == "fedtrimmedavg":  # robust: drop the trimmed_beta extremes per coordinate
        return FedTrimmedAvg(beta=t.trimmed_beta, **sampling)
    return FedAvg(**sampling)


def screen_reply(
    reply: Message, spec: Spec, max_norm: float | None, reference: dict[str, np.ndarray] | None
) -> str | None:
    """Why a training reply is unfit to aggregate, or None when it is fit."""
    arrays, metrics = reply.content.array_records, reply.content.metric_records
    if len(arrays) != 1 or len(metrics) != 1 or Metric.NUM_EXAMPLES not in next(iter(metrics.values())):
        return "malformed reply: needs one head ArrayRecord and one MetricRecord"
    reason = check_arrays(next(iter(arrays.values())), spec, max_norm, reference)
    return None if reason is None else f"update refused: {reason}"


class ScreenedStrategy(Strategy):
    """A Flower strategy that sees only updates that passed screening, and only enough of them.

    After `aggregate_train`, `refused` maps each refused reply's source node to the reason.
    """

    def __init__(self, strategy: Strategy, spec: Spec, min_sites: int, max_update_norm: float | None = None) -> None:
        super().__init__()
        self.strategy, self.spec = strategy, spec
        self.min_sites, self.max_update_norm = min_sites, max_update_norm
        self.current: dict[str, np.ndarray] | None = None
        self.refused: dict[int, str] = {}

    def __repr__(self) -> str:
        return f"ScreenedStrategy({self.strategy!r})"

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = {k: v.numpy() for k, v in arrays.items()}  # the update bound measures distance from this
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.refused, accepted = {}, []
        for reply in replies:
            reason = screen_reply(reply, self.spec, self.max_update_norm, self.current)
            if reason is None:
                accepted.append(reply)
            else:
                self.refused[reply.metadata.src_node_id] = reason
        sites = sum(int(next(iter(r.content.metric_records.values())).get(SITES_IN_REPLY, 1)) for r in accepted)
        if sites < self.min_sites:
            log(WARNING, "round %d: %d site(s) passed screening, fewer than train.min_sites = %d; global head "
                "unchanged", server_round, sites, self.min_sites)  # fmt: skip
            return None, None
        return self.strategy.aggregate_train(server_round, accepted)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def state(self) -> dict:
        """What carries over between rounds and across a resume: FedAdam's moments."""
        return {k: dict(v) for k in ("m_t", "v_t") if (v := getattr(self.strategy, k, None))}

    def restore(self, state: dict) -> None:
        for key, arrays in state.items():
            setattr(self.strategy, key, dict(arrays))
