"""Federated evaluation, one round behind: which sites score which model, and what the server makes of it.

Deployed, every Flower exchange pays a per-message floor of seconds; a round of its own for evaluation
would double it. So round r's training message asks the sites sampled for evaluation to score the head it
carries, the model of round r − 1, before they train (client/evaluate_round.py `carried_evaluation`), and
their training replies carry the releases: the federated metrics of model r − 1 arrive with round r. The
final model is scored in one exchange of its own after the last round (`evaluate_round`). A run of R rounds
is R training exchanges and one evaluation exchange.

Which models and sites are as before: the rounds `train.evaluates` names (round 0, the statistics release,
too when there is one), each scored by the sites `configure_evaluate` samples (`train.fraction_evaluate`),
seeded per round. A sampled site the round's training does not ask (`train.fraction_train` < 1) gets the
evaluation message of its own, in the same exchange where the protocol allows it.

No site sends a metric: each sends its statistics (common/privacy/evaluation.py), noised under DP, and the
server computes loss, accuracy, balanced accuracy and AUROC from their sum (post-processing). Under distributed
trust the statistics a training message carries arrive already summed, from SecAgg+'s masked slots
(server/federation/masked_evaluation.py): the server never holds one site's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

import numpy as np
from fedtransfer.common.config.run import RunConfig
from fedtransfer.common.model.intervals import accuracy_interval
from fedtransfer.common.privacy.evaluation import OVERALL, check_statistics, metrics_from_statistics, sum_statistics
from fedtransfer.common.wire.protocol import Cfg, DPRecord, Metric, Rec
from fedtransfer.server.federation.sites import Answer, SiteBook, answers, send_and_receive
from fedtransfer.server.federation.strategy import ScreenedStrategy
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import bytes_to_ndarray
from flwr.common.logger import log
from flwr.serverapp import Grid


@dataclass
class EvaluateRound:
    """What one model's evaluation left: the federated metrics (None: no site answered), each site's release."""

    metrics: dict[str, Any] | None = None
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)  # site -> its release's DP record and ε


@dataclass(frozen=True)
class Sampled:
    """The sites sampled to score the model of `model_round`: the evaluation messages Flower's strategy made."""

    model_round: int
    messages: list[Message]


@dataclass(frozen=True)
class Asked:
    """What a round's exchange asks: the training nodes that score the model first, and the evaluation messages
    of sampled nodes the round does not train (`train.fraction_train` < 1)."""

    model_round: int
    nodes: frozenset[int]
    alone: list[Message]


def asked_of(sampled: Sampled | None, training: Iterable[int]) -> Asked | None:
    """Split the sample between the round's training nodes and the rest."""
    if sampled is None:
        return None
    training = set(training)
    nodes = frozenset(m.metadata.dst_node_id for m in sampled.messages if m.metadata.dst_node_id in training)
    alone = [m for m in sampled.messages if m.metadata.dst_node_id not in training]
    return Asked(sampled.model_round, nodes, alone)


def carried_model(cfg: RunConfig, rnd: int) -> int | None:
    """The model round whose evaluation round `rnd`'s training carries, or None.

    Round r's head is the model of round r − 1; it is scored when `train.evaluates` names that round and the
    round exists (round 0 only with the statistics release, as client/evaluate_round.py plans it).
    """
    model = rnd - 1
    first = 0 if cfg.privacy.feature_stats else 1
    return model if model >= first and cfg.train.evaluates(model) else None


def sample(
    strategy: ScreenedStrategy, model_round: int, arrays: ArrayRecord, *, config: ConfigRecord, grid: Grid
) -> Sampled:
    """The evaluation messages Flower's strategy makes for `model_round` (its sampling; a copy of the config)."""
    return Sampled(
        model_round, list(strategy.configure_evaluate(model_round, arrays, ConfigRecord(dict(config)), grid))
    )


def asking(training: Iterable[Message], asked: Asked | None) -> list[Message]:
    """The round's training messages, those to the nodes `asked` asking for the evaluation first."""
    if asked is None:
        return list(training)
    out = []
    for msg in training:
        if msg.metadata.dst_node_id not in asked.nodes:
            out.append(msg)
            continue
        content = RecordDict(dict(msg.content.items()))  # Flower's messages share one RecordDict: a copy each
        content[Rec.CONFIG] = ConfigRecord({**msg.content[Rec.CONFIG], Cfg.EVALUATE_ROUND: asked.model_round})
        out.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=msg.metadata.dst_node_id))
    return out


def taken(content: RecordDict) -> RecordDict | None:
    """The evaluation records taken out of a training reply (None: it carries none).

    What stays is the training reply as the strategy screens it: one head, one metric record without the
    evaluation's ε. Under SecAgg+ the statistics come as tensor bytes (client/secure.py); unreadable bytes
    leave an empty record, which `read` refuses.
    """
    out = RecordDict()
    if Rec.EVALUATION in content.array_records:
        out[Rec.EVALUATION] = content.pop(Rec.EVALUATION)
    if Rec.EVALUATION_BYTES in content.config_records:
        packed = content.pop(Rec.EVALUATION_BYTES)
        try:
            out[Rec.EVALUATION] = ArrayRecord({k: Array(bytes_to_ndarray(v)) for k, v in packed.items()})  # type: ignore[arg-type]
        except (TypeError, ValueError):
            out[Rec.EVALUATION] = ArrayRecord()
    if Rec.EVALUATION_DP in content.config_records:
        out[Rec.EVALUATION_DP] = content.pop(Rec.EVALUATION_DP)
    metrics = content.metric_records.get(Rec.METRICS)
    if metrics is not None:
        epsilons = {k: metrics.pop(k) for k in (Metric.EVAL_EPSILON, Metric.EVAL_EPSILON_INDIVIDUAL) if k in metrics}
        if epsilons:
            out[Rec.METRICS] = MetricRecord(epsilons)
    # under distributed trust the statistics are in the masked sum: the reply holds the release's DP record only
    return out if Rec.EVALUATION in out or Rec.EVALUATION_DP in out else None


def read(
    rnd: int, released: list[tuple[str, RecordDict]], num_classes: int, summed: dict[str, np.ndarray] | None = None
) -> EvaluateRound:
    """The federated metrics of model `rnd` from the sites' releases, each checked before it is summed.

    `summed`: under distributed trust, the statistics SecAgg+ summed in the masked slots (the releases then carry
    their DP records only, server/federation/masked_evaluation.py).
    """
    if summed is not None:
        return _read_summed(rnd, released, num_classes, summed)
    out, stats = EvaluateRound(), []
    for site, content in released:
        values = {k: v.numpy() for k, v in content.array_records.get(Rec.EVALUATION, {}).items()}
        if (reason := check_statistics(values, num_classes)) is not None:
            log(WARNING, "round %d: evaluation at site %s refused: %s", rnd, site, reason)
            continue
        stats.append(values)
        out.sites[site] = evaluation_fields(content)
    if stats:
        out.metrics = _metrics(sum_statistics(stats), len(stats))
    return out


def _read_summed(
    rnd: int, released: list[tuple[str, RecordDict]], num_classes: int, summed: dict[str, np.ndarray]
) -> EvaluateRound:
    """The metrics of the masked sum, if any site's release is in it; each such site's DP record and ε.

    A site whose reply names no masked release added its noise share alone: it is in the sum, not in `sites`.
    A sampled site the round did not train answered an evaluation message of its own: its Gaussian release
    (fully noised at the site) is added to the sum.
    """
    out, summed = EvaluateRound(), dict(summed)
    for site, content in released:
        dp = content.config_records.get(Rec.EVALUATION_DP)
        plain = {k: v.numpy() for k, v in content.array_records.get(Rec.EVALUATION, {}).items()}
        if dp is not None and dp.get("mechanism") != "skellam" and check_statistics(plain, num_classes) is None:
            summed = sum_statistics([summed, plain])
        elif dp is None or dp.get("mechanism") != "skellam" or plain:
            log(WARNING, "round %d: evaluation at site %s refused: neither masked nor a DP release", rnd, site)
            continue
        out.sites[site] = evaluation_fields(content)
    if (reason := check_statistics(summed, num_classes)) is not None:
        log(WARNING, "round %d: the masked evaluation sum is unfit: %s", rnd, reason)
    elif out.sites:
        out.metrics = _metrics(summed, len(out.sites))
    return out


def _metrics(summed: dict[str, np.ndarray], sites: int) -> dict[str, Any]:
    metrics = metrics_from_statistics(summed) | {"sites": sites}
    # the released (noisy) record total, and Wilson on it: the sampling interval of these records'
    # accuracy; it leaves out the DP noise on the counts (its σ is in privacy.json's evaluation plan)
    records = max(round(float(summed[OVERALL][1])), 0)
    return metrics | {"records": records, "accuracy_interval95": accuracy_interval(metrics["accuracy"], records)}


def carried(rnd: int, got: list[tuple[Answer, RecordDict | None]], asked: Asked) -> list[tuple[str, RecordDict]]:
    """The releases of the nodes asked to evaluate, from their training replies (`taken`'s part of each)."""
    out = []
    for answer, evaluation in got:
        if answer.node not in asked.nodes:
            continue
        if evaluation is None:
            why = answer.reason or "its reply carries none (it declined the evaluation: its audit log says why)"
            log(WARNING, "round %d: evaluation of round %d at site %s: %s", rnd, asked.model_round, answer.site, why)
            continue
        out.append((answer.site, evaluation))
    return out


def evaluate_round(
    grid: Grid,
    rnd: int,
    arrays: ArrayRecord,
    *,
    config: ConfigRecord,
    strategy: ScreenedStrategy,
    book: SiteBook,
    timeout: float,
    num_classes: int,
) -> EvaluateRound:
    """The evaluation exchange of its own: the final model's, after the last round."""
    messages = sample(strategy, rnd, arrays, config=config, grid=grid).messages
    if not messages:
        return EvaluateRound()
    return read(rnd, alone(grid, rnd, messages, book=book, timeout=timeout), num_classes)


def alone(
    grid: Grid, rnd: int, messages: list[Message], *, book: SiteBook, timeout: float
) -> list[tuple[str, RecordDict]]:
    """Send evaluation messages and return the sites' releases."""
    return releases(rnd, messages, send_and_receive(grid, messages, timeout), book=book, timeout=timeout)


def releases(
    rnd: int, messages: list[Message], replies: list[Message], *, book: SiteBook, timeout: float
) -> list[tuple[str, RecordDict]]:
    """The releases replying to evaluation `messages`; a site that failed is logged and left out."""
    out = []
    for a in answers(messages, replies, book, timeout):
        if a.status is not None or a.reply is None:
            log(WARNING, "round %d: evaluation at site %s failed: %s", rnd, a.site, a.reason)
        else:
            out.append((a.site, a.reply.content))
    return out


def evaluation_fields(content: RecordDict) -> dict[str, Any]:
    """An evaluation release's DP record, composition and ε, as privacy.json records them ({} without DP)."""
    dp = content.config_records.get(Rec.EVALUATION_DP)
    if dp is None:
        return {}
    metrics = content.metric_records.get(Rec.METRICS, MetricRecord())
    fields = DPRecord.from_mapping(dp).as_dict() | {"composition": str(dp.get("composition", ""))}
    if Metric.EVAL_EPSILON in metrics:
        fields["epsilon"] = float(metrics[Metric.EVAL_EPSILON])
    if Metric.EVAL_EPSILON_INDIVIDUAL in metrics:  # distributed trust: against the site's own messages
        fields["epsilon_individual"] = float(metrics[Metric.EVAL_EPSILON_INDIVIDUAL])
    return fields
