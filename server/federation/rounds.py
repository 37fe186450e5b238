"""One round's exchange with the sites: training, plain or SecAgg+, with the evaluation of the model it sends.

Each returns what every asked site did, by name, and what the server received (the evaluation releases
apart, server/federation/evaluation.py), so the round loop only decides and records. Screening and the
minimum number of sites are the `ScreenedStrategy`'s business; attributing replies to sites is
`fedtransfer.server.federation.sites`'.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

import numpy as np
from fedtransfer.common.config.run import RunConfig, SecAggConfig
from fedtransfer.common.privacy.mechanisms import mechanism_for
from fedtransfer.common.storage.audit_log import update_digest
from fedtransfer.common.wire.exchange import arrays_to_numpy, wire_bytes
from fedtransfer.common.wire.protocol import Cfg, DPRecord, Metric, Rec, SiteStatus
from fedtransfer.common.wire.secure_sum import sum_of_mean
from fedtransfer.server.federation.evaluation import (
    Asked,
    Sampled,
    alone,
    asked_of,
    asking,
    carried,
    releases,
    taken,
)
from fedtransfer.server.federation.masked_evaluation import split_slots, with_slot_placeholders
from fedtransfer.server.federation.secure import SecureRound, secure_round
from fedtransfer.server.federation.sites import Answer, SiteBook, SiteRound, answer_of, answers, send_and_receive
from fedtransfer.server.federation.strategy import SITES_IN_REPLY, ScreenedStrategy
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.logger import log
from flwr.serverapp import Grid

_OPTIONAL = {
    Metric.EPSILON: "epsilon",
    Metric.EPSILON_INDIVIDUAL: "epsilon_individual",
    Metric.TRAIN_LOSS: "train_loss",
    Metric.WIRE_BYTES: "bytes_sent",
}


@dataclass
class TrainRound:
    """What one training exchange left: each asked site's part, the new head (None: unchanged)."""

    sites: dict[str, SiteRound] = field(default_factory=dict)
    arrays: ArrayRecord | None = None
    received: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (site, digest of what arrived)
    bytes_received: int = 0
    halted: str | None = None  # why secure aggregation produced no mean
    # the evaluation of the model sent this round (the round before's), by the sites asked: (site, its release)
    evaluations: list[tuple[str, RecordDict]] = field(default_factory=list)
    # under distributed trust: the sum of their statistics, read back from the masked slots (None: not masked)
    summed_evaluation: dict[str, np.ndarray] | None = None

    @property
    def trained(self) -> list[str]:
        return sorted(n for n, s in self.sites.items() if s.status == SiteStatus.TRAINED)


def trained_fields(reply: Message) -> dict[str, Any]:
    """A training reply's examples, steps, ε and DP parameters, as privacy.json records them."""
    metrics = reply.content.metric_records.get(Rec.METRICS, MetricRecord())
    fields: dict[str, Any] = {
        "num_examples": float(metrics.get(Metric.NUM_EXAMPLES, 0)),  # under DP the site's released count
        "steps": int(metrics.get(Metric.STEPS, 0)),
    }
    fields |= {ours: metrics[key] for key, ours in _OPTIONAL.items() if key in metrics}
    if (dp := reply.content.config_records.get(Rec.DP)) is not None:
        fields |= DPRecord.from_mapping(dp).as_dict()
    return fields


def plain_round(
    grid: Grid,
    rnd: int,
    arrays: ArrayRecord,
    *,
    config: ConfigRecord,
    strategy: ScreenedStrategy,
    book: SiteBook,
    timeout: float,
    sampled: Sampled | None = None,
) -> TrainRound:
    """Every site's head reaches the server; the strategy screens it before aggregating.

    `sampled`: the sites that score the model sent first; those the round does not train get the evaluation
    message of their own in the same exchange.
    """
    messages = list(strategy.configure_train(rnd, arrays, config, grid))
    asked = asked_of(sampled, (m.metadata.dst_node_id for m in messages))
    messages = asking(messages, asked)
    alone = asked.alone if asked is not None else []
    replies = send_and_receive(grid, messages + alone, timeout)
    got = answers(messages, replies, book, timeout)
    out = TrainRound()
    parts = [(a, taken(a.reply.content) if a.reply is not None and a.status is None else None) for a in got]
    if asked is not None:
        out.evaluations = carried(rnd, parts, asked) + releases(rnd, alone, replies, book=book, timeout=timeout)
    candidates = [a for a in got if a.status is None and a.reply is not None]
    # counted before aggregation: FedMedian consumes the arrays
    out.bytes_received = sum(wire_bytes(r) for a in candidates for r in a.reply.content.array_records.values())
    out.arrays, _ = strategy.aggregate_train(rnd, [a.reply for a in candidates])
    for a in got:
        if a.status is not None:
            out.sites[a.site] = SiteRound(a.status, a.reason)
        elif a.node in strategy.refused:
            out.sites[a.site] = SiteRound(SiteStatus.REFUSED, strategy.refused[a.node])
        else:
            out.sites[a.site] = SiteRound(SiteStatus.TRAINED, fields=trained_fields(a.reply))
            head = next(iter(a.reply.content.array_records.values()))
            out.received.append((a.site, update_digest(arrays_to_numpy(head))))
    return out


def secure_train_round(
    grid: Grid,
    rnd: int,
    arrays: ArrayRecord,
    *,
    config: ConfigRecord,
    strategy: ScreenedStrategy,
    book: SiteBook,
    cfg: RunConfig,
    sampled: Sampled | None = None,
    num_classes: int = 0,
) -> TrainRound:
    """SecAgg+: the server receives masked vectors and reconstructs only their weighted mean.

    Round 0's statistics release (`config` names it) goes the same way: the message carries zeros
    shaped like the release (the strategy's spec), and the server reads back the exact sums. The
    evaluation of the model sent (`sampled`) rides in the stage-2 reply, beside the masked vector; a
    sampled site the round does not train gets the evaluation message of its own after the round. Under
    distributed trust the statistics are masked too: the head sent has the evaluation's slots (zeros shaped like
    the statistics of `num_classes` classes, server/federation/masked_evaluation.py), and the server reads back
    only their sum over the round's sites.
    """
    release = config.get(Cfg.RELEASE) is not None
    if release:
        arrays = ArrayRecord({n: Array(np.zeros(shape, dtype=dtype)) for n, (shape, dtype) in strategy.spec.items()})
    nodes = [m.metadata.dst_node_id for m in strategy.configure_train(rnd, arrays, config, grid)]
    asked = asked_of(sampled, nodes)
    head_names = list(arrays.keys())
    slotted = asked is not None and not release and mechanism_for(cfg).distributed
    if slotted:
        arrays = with_slot_placeholders(arrays, num_classes)
    extra = {n: {Cfg.EVALUATE_ROUND: asked.model_round} for n in asked.nodes} if asked is not None else {}
    timeout = cfg.train.round_timeout_s
    sec = secure_round(
        grid, rnd, arrays, config=config, node_ids=nodes, settings=cfg.secagg, timeout=timeout, per_node=extra
    )
    out = TrainRound(bytes_received=sum(sec.payload.values()))
    if asked is not None:
        out.evaluations = _secure_evaluations(grid, rnd, sec, asked, nodes=nodes, book=book, timeout=timeout)
    _secure_statuses(out, sec, nodes, book=book, timeout=timeout)
    if sec.aggregate is None:
        out.halted = (
            f"secure aggregation halted: {len(sec.trained)} of {len(nodes)} sites sent masked vectors, too "
            f"few for the reconstruction threshold (secagg.reconstruction_threshold = "
            f"{cfg.secagg.reconstruction_threshold:g})"
        )
        log(WARNING, "round %d: %s; global head unchanged", rnd, out.halted)
        return out
    slots = (head_names, num_classes) if slotted else None
    _secure_mean(grid, rnd, sec, out, strategy=strategy, cfg=cfg, release=release, slots=slots)
    return out


def _secure_mean(
    grid: Grid,
    rnd: int,
    sec: SecureRound,
    out: TrainRound,
    *,
    strategy: ScreenedStrategy,
    cfg: RunConfig,
    release: bool,
    slots: tuple[list[str], int] | None,
) -> None:
    """The new head from SecAgg+'s mean, into `out`; where the head sent had the evaluation's slots (`slots`: the
    head's tensor names and the class count), their masked sum too, split off first."""
    examples = sum(out.sites[n].fields["num_examples"] for n in out.trained)
    extra: dict[str, float] = {}
    aggregate = sec.aggregate
    assert aggregate is not None
    if slots is not None:
        sec, aggregate, out.summed_evaluation = split_slots(sec, aggregate, slots[0], cfg.secagg, slots[1])
    mechanism = mechanism_for(cfg)
    quanta = mechanism.secure_sum_quanta(aggregate.keys(), release=release)
    if quanta is not None:  # the sites' statistics or gradient sums, read back exactly
        aggregate = secure_sum(sec, aggregate, quanta, cfg.secagg)
    if not release and mechanism.sends_gradient_sums:  # FedSGD divides the sum by Σ q·n
        extra[Metric.EXPECTED_BATCH] = sum(
            float(r.content.metric_records[Rec.METRICS][Metric.EXPECTED_BATCH]) for r in sec.trained.values()
        )
    reply = _as_one_reply(grid, rnd, mean=aggregate, examples=examples, sites=len(sec.trained), extra=extra)
    out.arrays, _ = strategy.aggregate_train(rnd, [reply])


def _secure_evaluations(
    grid: Grid, rnd: int, sec: SecureRound, asked: Asked, *, nodes: list[int], book: SiteBook, timeout: float
) -> list[tuple[str, RecordDict]]:
    """The evaluations the stage-2 replies carried (a site that left or never answered: its status), then those
    of the sampled sites this round did not train, asked in a message of their own."""
    parts = [(answer_of(n, r, book), taken(r.content)) for n, r in sorted(sec.trained.items())]
    parts += [(answer_of(n, e, book), None) for n, e in sorted(sec.errors.items()) if n not in sec.trained]
    lost = [(Answer(n, book.name(n), SiteStatus.NO_REPLY, f"no reply within {timeout:g}s"), None) for n in nodes]
    parts += [p for p in lost if p[0].node not in sec.trained and p[0].node not in sec.errors]
    evaluations = carried(rnd, parts, asked)
    if asked.alone:
        evaluations += alone(grid, rnd, asked.alone, book=book, timeout=timeout)
    return evaluations


def _secure_statuses(out: TrainRound, sec: SecureRound, nodes: list[int], *, book: SiteBook, timeout: float) -> None:
    """Each asked site's part in `out`: trained (with what it sent, masked), failed, or no reply."""
    for node, reply in sorted(sec.trained.items()):
        site = answer_of(node, reply, book).site
        fields = trained_fields(reply) | {"bytes_sent": sec.payload[node]}
        out.sites[site] = SiteRound(SiteStatus.TRAINED, fields=fields)
        out.received.append(
            (site, update_digest(sec.masked[node]) if node in sec.masked else {"sha256": "", "tensors": []})
        )
    for node, error in sorted(sec.errors.items()):
        if node not in sec.trained:  # a site leaving after it sent its masked vector is in the mean
            answer = answer_of(node, error, book)
            out.sites[answer.site] = SiteRound(answer.status or SiteStatus.FAILED, answer.reason)
    for node in nodes:
        if node not in sec.trained and node not in sec.errors:
            out.sites[book.name(node)] = SiteRound(SiteStatus.NO_REPLY, f"no reply within {timeout:g}s")


def secure_sum(sec: SecureRound, mean: ArrayRecord, quanta: dict[str, float], s: SecAggConfig) -> ArrayRecord:
    """The sum of the sites' messages (fedsgd's gradient sums, or the statistics: `quanta`, each tensor's unit γ)
    from SecAgg+'s mean of their grid vectors (common/wire/secure_sum.py)."""
    values = [
        sum_of_mean(v, len(sec.trained), quanta[n], s.clipping_range, s.quantization_range)
        for n, v in zip(mean.keys(), sec.mean64 or [], strict=True)
    ]
    return ArrayRecord({n: Array(v.astype(mean[n].dtype)) for n, v in zip(mean.keys(), values, strict=True)})


def _as_one_reply(
    grid: Grid, rnd: int, *, mean: ArrayRecord, examples: int, sites: int, extra: dict[str, float]
) -> Message:
    """The SecAgg+ aggregate as one reply standing for `sites` sites: FedAvg keeps it, FedAdam and FedSGD step."""
    meta = Metadata(
        run_id=grid.run.run_id,
        message_id=f"secagg-{rnd}",
        src_node_id=0,
        dst_node_id=0,
        reply_to_message_id="",
        group_id=str(rnd),
        created_at=time.time(),
        ttl=60.0,
        message_type=MessageType.TRAIN,
    )
    metrics = MetricRecord({Metric.NUM_EXAMPLES: examples, SITES_IN_REPLY: sites, **extra})
    return Message(content=RecordDict({Rec.ARRAYS: mean, Rec.METRICS: metrics}), metadata=meta)
