"""Aggregation of head updates: Flower's strategies, wrapped so that only screened updates reach them.

`ScreenedStrategy` wraps any Flower strategy the way Flower's own DP wrappers do
(`DifferentialPrivacyServerSideFixedClipping` wraps a strategy and adds clipping and
noise): before FedAvg/FedProx/FedAdam/FedMedian/FedTrimmedAvg sees a reply, it must carry
exactly the head's tensor names, shapes and dtypes, all finite, within the update bound;
and a round aggregates only when at least `train.min_sites` sites passed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from logging import WARNING
from typing import Any

import numpy as np
from fedtransfer.common.config.run import RunConfig, TrainConfig
from fedtransfer.common.privacy.mechanisms import mechanism_for
from fedtransfer.common.wire.exchange import Spec, check_arrays
from fedtransfer.common.wire.protocol import Metric
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Strategy

SITES_IN_REPLY = "num-sites"  # metric of a reply that stands for several sites (the SecAgg+ mean)


def make_strategy(cfg: RunConfig, frozen: frozenset[str] = frozenset()) -> Strategy:
    """FedSGD when the run's mechanism sends gradient sums, else Flower's strategy for `train.strategy`
    (`frozen`: the head's buffers, which FedSGD leaves as they are)."""
    t = cfg.train
    sampling = {
        "fraction_train": t.fraction_train,
        "fraction_evaluate": t.fraction_evaluate,
        "min_train_nodes": t.min_sites,
        "min_evaluate_nodes": t.min_sites if t.fraction_evaluate > 0 else 0,
        "min_available_nodes": t.min_sites,
    }
    if mechanism_for(cfg).sends_gradient_sums:
        return FedSGD(t.learning_rate, t.server_momentum, frozen, **sampling)
    if t.strategy == "fedprox":
        return FedProx(proximal_mu=t.proximal_mu, **sampling)
    if t.strategy == "fedadam":
        return FedAdam(eta=t.server_learning_rate, **sampling)
    if t.strategy == "fedmedian":  # robust: coordinate-wise median
        return FedMedian(**sampling)
    if t.strategy == "fedtrimmedavg":  # robust: drop the trimmed_beta extremes per coordinate
        return FedTrimmedAvg(beta=t.trimmed_beta, **sampling)
    return FedAvg(**sampling)


def server_step(
    weights: dict[str, np.ndarray],
    gradient_sum: dict[str, np.ndarray],
    velocity: dict[str, np.ndarray],
    expected_batch: float,
    learning_rate: float,
    momentum: float,
    frozen: frozenset[str] = frozenset(),
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The fedsgd step: g = Σ gradient sums / Σ q·n, v ← μ·v + g, w ← w − η·v; returns (w, v).

    The divisor is the public expected batch size, never the realised one (which is private);
    momentum and learning rate act on an already private gradient: post-processing. Tensors
    in `frozen` (the head's centring mean) have no gradient and stay as they are.
    """
    new_w, new_v = {}, {}
    for name, w in weights.items():
        if name in frozen:
            new_w[name] = w
            continue
        g = gradient_sum[name].astype(np.float64) / expected_batch
        v = momentum * velocity[name] + g if name in velocity else g
        new_w[name], new_v[name] = (w - learning_rate * v).astype(w.dtype), v
    return new_w, new_v


class FedSGD(FedAvg):
    """DP-FedSGD at the server: sum the sites' noisy gradient sums, divide by Σ q·n, take a heavy-ball step.

    Node sampling, evaluation and messages are FedAvg's; only aggregation differs. The
    velocity is called `m_t`, like FedAdam's first moment, so checkpoints carry it over.
    """

    def __init__(self, learning_rate: float, momentum: float, frozen: frozenset[str], **sampling: Any) -> None:
        super().__init__(**sampling)
        self.learning_rate, self.momentum, self.frozen = learning_rate, momentum, frozen
        self.current: dict[str, np.ndarray] = {}
        self.m_t: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"FedSGD(learning_rate={self.learning_rate}, momentum={self.momentum})"

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = {k: v.numpy() for k, v in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if not replies:
            return None, None
        total = {k: np.zeros(v.shape, np.float64) for k, v in self.current.items()}
        batch = 0.0
        for reply in replies:
            for name, arr in next(iter(reply.content.array_records.values())).items():
                total[name] += arr.numpy()
            batch += float(next(iter(reply.content.metric_records.values()))[Metric.EXPECTED_BATCH])
        weights, self.m_t = server_step(
            self.current, total, self.m_t, batch, self.learning_rate, self.momentum, self.frozen
        )
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()}), MetricRecord(
            {"expected-batch": batch}
        )


class StatisticsRelease(FedAvg):
    """Round 0: every site's noisy per-class feature sums and counts, summed (common.privacy.fedsgd's release)."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        total: dict[str, np.ndarray] = {}
        for reply in replies:
            for name, arr in next(iter(reply.content.array_records.values())).items():
                total[name] = total.get(name, 0.0) + arr.numpy().astype(np.float64)
        if not total:
            return None, None
        return ArrayRecord({k: Array(v.astype(np.float32)) for k, v in total.items()}), None


def release_strategy(t: TrainConfig) -> StatisticsRelease:
    """Round 0 asks every connected site (not a sample): each releases once, before training."""
    return StatisticsRelease(
        fraction_train=1.0,
        fraction_evaluate=t.fraction_evaluate,
        min_train_nodes=t.min_sites,
        min_evaluate_nodes=t.min_sites if t.fraction_evaluate > 0 else 0,
        min_available_nodes=t.min_sites,
    )


def screen_reply(
    reply: Message,
    spec: Spec,
    max_norm: float | None,
    reference: dict[str, np.ndarray] | None,
    gradients: bool = False,
) -> str | None:
    """Why a training reply is unfit to aggregate, or None when it is fit.

    A fedsgd reply (`gradients`) is a gradient sum: the same names, shapes and dtypes as the
    head, all finite, with the site's public expected batch size beside it.
    """
    arrays, metrics = reply.content.array_records, reply.content.metric_records
    if len(arrays) != 1 or len(metrics) != 1 or Metric.NUM_EXAMPLES not in next(iter(metrics.values())):
        return "malformed reply: needs one head ArrayRecord and one MetricRecord"
    if gradients and not _positive(next(iter(metrics.values())).get(Metric.EXPECTED_BATCH)):
        return f"malformed reply: a fedsgd gradient sum needs a positive finite {Metric.EXPECTED_BATCH!s}"
    # the bound measures a head's distance from the round's head: a gradient sum or a release has no such reference
    bounded = max_norm is not None and not gradients
    reason = check_arrays(next(iter(arrays.values())), spec, max_norm, reference if bounded else None)
    return None if reason is None else f"update refused: {reason}"


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


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
        gradients = isinstance(self.strategy, FedSGD)
        for reply in replies:
            reason = screen_reply(reply, self.spec, self.max_update_norm, self.current, gradients)
            if reason is None:
                accepted.append(reply)
            else:
                self.refused[reply.metadata.src_node_id] = reason
        sites = sum(int(next(iter(r.content.metric_records.values())).get(SITES_IN_REPLY, 1)) for r in accepted)
        if sites < self.min_sites:
            log(
                WARNING,
                "round %d: %d site(s) passed screening, fewer than train.min_sites = %d; global head unchanged",
                server_round,
                sites,
                self.min_sites,
            )
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
