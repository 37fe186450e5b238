"""A site's answer to a training message: check it, charge the privacy budget, train, reply.

The order is the promise. The server's message is checked before any data is touched.
The budget is checked against the site's ledger before training, and the ledger records
the round before the reply is cached and logged: a crash in between can only over-count
ε, never send an update that was not charged. An evaluation the message asks for (of the head it carries,
client/evaluate_round.py) is charged before training starts, and only once the training's own budget check
has passed. What leaves the site is built from the
head alone (`fedtransfer.common.wire.exchange.head_to_arrays`), with the DP parameters in a `DPRecord`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from fedtransfer.client.dp_count import released_count, remember_release
from fedtransfer.client.evaluate_masked import masked_evaluation, with_slots
from fedtransfer.client.evaluate_round import carried_evaluation
from fedtransfer.client.received import local_head, received_head
from fedtransfer.client.replay import ReplyCache, request_key
from fedtransfer.client.secure import head_names, is_secure, secure_reply
from fedtransfer.client.site import Declined, Site, enforce_policy
from fedtransfer.client.site_log import record
from fedtransfer.common.config.run import RunConfig
from fedtransfer.common.privacy.calibration import epsilon_of, require_secure_rng
from fedtransfer.common.privacy.counts import round_zero_release
from fedtransfer.common.privacy.coverage import sent_values
from fedtransfer.common.privacy.evaluation_skellam import evaluation_quantum, slots
from fedtransfer.common.privacy.fedsgd import Units, make_generator, synthetic_users, user_seed
from fedtransfer.common.privacy.ledger import PrivacyLedger
from fedtransfer.common.privacy.mechanisms import Mechanism, SiteTensors, Trained, mechanism_for
from fedtransfer.common.privacy.plans import Plan
from fedtransfer.common.storage.audit_log import update_digest
from fedtransfer.common.wire.exchange import arrays_to_numpy, wire_bytes
from fedtransfer.common.wire.protocol import Cfg, DPRecord, Event, Metric, Rec, site_record
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from torch import nn


def privacy_plan(
    site: Site,
    cfg: RunConfig,
    ledger: PrivacyLedger,
    dim: int,
    *,
    mechanism: Mechanism | None = None,
    released: float | None = None,
) -> Plan | None:
    """The run's DP plan for this site's data, within its policy and budget; None without DP.

    The run's mechanism (common/privacy/mechanisms/) makes it: `dim` is the head's trainable coordinates
    (the rounding's sensitivity under distributed trust), `released` the count this site released in round 0
    (None before it has: client/dp_count.py); site.plan remembers it on a deployed site.
    """
    mechanism = mechanism or mechanism_for(cfg)
    try:
        if cfg.privacy.enabled and cfg.privacy.secure_mode:
            require_secure_rng()
        plan = mechanism.plan(
            num_samples=len(site.train_y),
            units=site_units(site, cfg).count if cfg.privacy.enabled else 0,
            dim=dim,
            feature_dim=int(site.train_x.shape[1]),
            num_classes=len(site.data.train.classes),
            remember=site.plan,
            released=released,
        )
    except ValueError as err:  # δ ≥ 1/n for this site, secure_mode without torchcsprng, a share that could wrap
        raise Declined(str(err)) from None
    spent = 0.0 if plan is None else ledger.spent_in_other_runs(cfg.privacy.target_delta, cfg.privacy.accountant)
    enforce_policy(site.policy, cfg, plan, spent, distributed=mechanism.distributed, policy_file=site.policy_file)
    return plan


def site_units(site: Site, cfg: RunConfig) -> Units:
    """What one sampling and clipping unit is at this site: a record, or a user (privacy.unit)."""
    if cfg.privacy.unit != "user":
        return Units.records(len(site.train_y))
    if site.data.train.users is not None:  # its user column, users file or schema's user: (as the auditor's units)
        return Units.of_users(torch.from_numpy(site.data.train.user_codes()))
    if cfg.privacy.synthetic_users > 0:  # built-in mnist/digits: no people in them
        return Units.of_users(
            synthetic_users(len(site.train_y), cfg.privacy.synthetic_users, user_seed(cfg.seed, site.name))
        )
    # a deployed site whose own file names nobody (a simulation is refused before Flower starts)
    raise Declined(
        "privacy.unit: user, but this site's data names no person per record; set user_column (text) "
        "or users_file (imagefolder, npz) in the site's config, or user: in its table schema copy"
    )


def site_tensors(site: Site, cfg: RunConfig) -> SiteTensors:
    """The site's training data as its mechanism sees it: cached features, labels, units and classes."""
    return SiteTensors(site.train_x, site.train_y, site_units(site, cfg), len(site.data.train.classes))


@dataclass(frozen=True)
class Work:
    """What a site computed for a message (the mechanism's `Trained`), and the release it was, if one."""

    done: Trained
    release: str | None = None


def train(site: Site, cfg: RunConfig, msg: Message) -> RecordDict:
    """Train the head on this site's features (DP when the run says so) and reply with the head only."""
    server_round, arrays, conf = received_head(site, msg)
    if site.accept_app_version is not None and conf.get(Cfg.APP_VERSION) != site.accept_app_version:
        raise Declined(f"site pins app version {site.accept_app_version}, the run is {conf.get(Cfg.APP_VERSION)}")
    secure = is_secure(msg)  # only secaggplus_mod (see client_app._secure_mod) hands us a SecAgg+ message
    mechanism = mechanism_for(cfg)
    try:
        mechanism.check_message(secure=secure)
    except ValueError as err:
        raise Declined(str(err)) from None
    run_id, key = str(conf[Cfg.RUN_ID]), request_key(arrays, conf)
    cache = ReplyCache(site.replies_dir)
    if (cached := cache.load(run_id, key)) is not None:
        # a resumed coordinator repeating the round in flight: the same bytes again, no training, no new ε
        digest = update_digest(arrays_to_numpy(cached[Rec.ARRAYS]))
        record(site, msg, Event.REPLY_REPLAYED, request=key, update=digest)
        if not secure:
            return cached
        return _secure(with_slots(site, cfg, cached, conf, server_round), conf, cfg, mechanism, replayed=True)
    ledger = PrivacyLedger(site.ledger_path, run_key=run_id)
    head = local_head(
        site, cfg, None if secure and conf.get(Cfg.RELEASE) is not None else arrays, len(site.data.train.classes)
    )
    release = conf.get(Cfg.RELEASE) is not None or server_round == 0
    released = released_count(site, run_id) if cfg.privacy.enabled else None
    dim = sum(p.numel() for p in head.parameters())
    plan = privacy_plan(site, cfg, ledger, dim, mechanism=mechanism, released=released)  # its policy first
    if plan is not None and not release and released is None:
        raise Declined(
            "this site released no record count in round 0 of this run; under DP it sends no weight or sample "
            "rate that would reveal its exact count, so it sits this run out"
        )
    if plan is not None and conf.get(Cfg.EVALUATE_ROUND) is not None:
        ledger.check_round(plan)  # a training its budget declines carries no evaluation: none is charged for it
    masked = masked_evaluation(cfg, conf, secure=secure)
    evaluation = carried_evaluation(
        site, cfg, msg, head=head, conf=conf, server_round=server_round, ledger=ledger, masked=masked
    )
    started = time.monotonic()
    work = _work(site, cfg, mechanism, conf=conf, server_round=server_round, plan=plan, ledger=ledger, head=head)
    seconds = round(time.monotonic() - started, 4)  # stays in the site's own log: a timing tracks n
    count = None if plan is None else released_count(site, run_id)  # round 0's, just released there
    answer, dp = _answer(site, mechanism, work, plan=plan, ledger=ledger, server_round=server_round, count=count)
    if evaluation is not None:
        carry(answer, evaluation)
    cache.save(run_id, key, answer)
    digest = update_digest(arrays_to_numpy(answer[Rec.ARRAYS]))
    logged = {"update": digest, "dp": None if dp is None else dp.as_dict(), "train_loss": work.done.loss}
    logged |= {"train_s": seconds, "examples": work.done.metrics.get(Metric.NUM_EXAMPLES)}  # exact: kept here
    logged["sent"] = sent_values(answer)  # every value that leaves, for the audit's coverage check
    if work.release is not None:
        logged["release"] = work.release
        if count is not None:  # the count this release gave away: what every later weight and rate follows from
            logged["released_count"] = count
    if secure:  # the plain head stays here; client_app._secure_mod logs the masked vectors that leave
        record(site, msg, Event.UPDATE_TRAINED, **logged)
        return _secure(with_slots(site, cfg, answer, conf, server_round), conf, cfg, mechanism, replayed=False)
    record(site, msg, Event.UPDATE_SENT, **logged)
    return answer


def carry(answer: RecordDict, evaluation: RecordDict) -> None:
    """Put the evaluation's records into the training reply: its statistics and DP record as they are, its
    ε beside the training metrics (the server takes them out again before it screens the update)."""
    for name, rec in evaluation.items():
        if name == Rec.METRICS:
            answer[Rec.METRICS] = MetricRecord({**answer[Rec.METRICS], **rec})
        else:
            answer[name] = rec


def _work(
    site: Site,
    cfg: RunConfig,
    mechanism: Mechanism,
    *,
    conf: ConfigRecord,
    server_round: int,
    plan: Plan | None,
    ledger: PrivacyLedger,
    head: nn.Module,
) -> Work:
    """Round 0's statistics release or a training round, as the mechanism does them, each charged before it runs."""
    seed = site.round_seed(str(conf[Cfg.RUN_ID]), server_round)
    data = site_tensors(site, cfg)
    if server_round == 0 or conf.get(Cfg.RELEASE) is not None:
        kind = round_zero_release(cfg.privacy)
        if kind is None or conf.get(Cfg.RELEASE) != kind or server_round != 0:
            raise Declined(
                f"round {server_round}: this run (privacy.feature_stats = {cfg.privacy.feature_stats}, "
                f"privacy.enabled = {cfg.privacy.enabled}) has no release {conf.get(Cfg.RELEASE)!r}"
            )
        if any(r.get("release") == kind for r in ledger.entry["rounds"]):
            raise Declined(f"{kind} were already released in this run; a second release is refused")
        if plan is not None:
            ledger.check_round(plan, plan.stats_event)
        generator = make_generator(seed, cfg.privacy.secure_mode, site.train_x.device)
        released, event = mechanism.release(data, plan, generator)
        history = ledger.history if event is None else [*ledger.history, event]
        if plan is not None:  # its noisy counts weigh this site from now on (client/dp_count.py)
            remember_release(site, str(conf[Cfg.RUN_ID]), released)
        metrics: dict[str, float | int] = {Metric.NUM_EXAMPLES: data.units.count}
        return Work(Trained(ArrayRecord(released), None, 1, history, event, metrics), kind)
    if plan is not None:
        ledger.check_round(plan)
    proximal_mu = float(conf.get(Cfg.PROXIMAL_MU, 0.0))
    return Work(mechanism.train_round(head, data, plan, ledger.history, seed=seed, proximal_mu=proximal_mu))


def _answer(
    site: Site,
    mechanism: Mechanism,
    work: Work,
    *,
    plan: Plan | None,
    ledger: PrivacyLedger,
    server_round: int,
    count: float | None,
) -> tuple[RecordDict, DPRecord | None]:
    """The reply: the arrays, metrics, site identity and, under DP, this work's DP parameters (ledger first).

    Under DP the released `count` (client/dp_count.py) stands for the exact record count everywhere the reply
    had one: the weight, and fedsgd's expected batch q·n, which becomes q·count; a site with no released count
    sends nothing under DP (ValueError: `train` declines first). Without DP nothing is promised.
    """
    done = work.done
    metrics = {**done.metrics, Metric.STEPS: done.steps, Metric.WIRE_BYTES: wire_bytes(done.arrays)}
    exact = float(metrics[Metric.NUM_EXAMPLES])
    if plan is not None:  # under DP: the released count (client/dp_count.py)
        if count is None:
            raise ValueError("under DP a reply needs the count released in round 0; none was")
        metrics[Metric.NUM_EXAMPLES] = count
        if Metric.EXPECTED_BATCH in metrics:
            metrics[Metric.EXPECTED_BATCH] = float(metrics[Metric.EXPECTED_BATCH]) * count / max(exact, 1.0)
    answer = RecordDict({Rec.ARRAYS: done.arrays, Rec.SITE: site_record(site.name)})
    if plan is None or done.event is None:
        # without DP nothing is promised, and the loss helps; under DP it would be an unaccounted release
        if done.loss is not None:
            metrics[Metric.TRAIN_LOSS] = done.loss
        answer[Rec.METRICS] = MetricRecord(metrics)
        return answer, None
    dp = mechanism.describe(plan, done.event, release=work.release is not None)
    metrics[Metric.EPSILON] = ledger.record_round(server_round, plan, done.history, work.release)
    if plan.distributed:  # the second ε: against this site's own message, were secure aggregation bypassed
        metrics[Metric.EPSILON_INDIVIDUAL] = epsilon_of(done.history, plan.target_delta, plan.accountant, True)
    answer[Rec.METRICS] = MetricRecord(metrics)
    answer[Rec.DP] = dp.to_record()
    return answer, dp


def _secure(
    answer: RecordDict, conf: ConfigRecord, cfg: RunConfig, mechanism: Mechanism, *, replayed: bool
) -> RecordDict:
    """Our reply in the form secaggplus_mod masks; a head SecAgg+ would clip silently is declined."""
    try:
        names = head_names(conf)
        quanta = mechanism.secure_sum_quanta(names, release=conf.get(Cfg.RELEASE) is not None)
        if quanta is not None and (masked := slots(names)):  # the evaluation's slots, in units of γ_e
            quanta |= dict.fromkeys(masked, evaluation_quantum(cfg.secagg))
        return secure_reply(answer, names, cfg.secagg, replayed, quanta)
    except ValueError as err:
        raise Declined(str(err)) from None
