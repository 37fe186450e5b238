"""A site's answer to a training message: check it, charge the privacy budget, train, reply.

The order is the promise. The server's message is checked before any data is touched.
The budget is checked against the site's ledger before training, and the ledger records
the round before the reply is cached and logged: a crash in between can only over-count
ε, never send an update that was not charged. What leaves the site is built from the
head alone (`fedtransfer.common.wire.exchange.head_to_arrays`), with the DP parameters in a `DPRecord`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from fedtransfer.client.replay import ReplyCache, request_key
from fedtransfer.client.secure import head_names, instructions, is_secure, secure_reply
from fedtransfer.client.site import Declined, Site, enforce_policy
from fedtransfer.client.site_log import record
from fedtransfer.common.config.run import RunConfig
from fedtransfer.common.model.finetune import make_top
from fedtransfer.common.privacy.calibration import (
    DPPlan,
    epsilon_of,
    plan_distributed,
    plan_dp,
    plan_fedsgd,
    require_secure_rng,
)
from fedtransfer.common.privacy.dp_sgd import LocalTraining, train_head
from fedtransfer.common.privacy.fedsgd import (
    STATS_NORM,
    Units,
    add_noise,
    clipped_gradient_sum,
    make_generator,
    release_statistics,
    secure_sum_quanta,
    skellam_statistics,
    synthetic_users,
    user_seed,
)
from fedtransfer.common.privacy.ledger import PrivacyLedger
from fedtransfer.common.privacy.skellam import sample, share_wrap_bound
from fedtransfer.common.storage.audit_log import update_digest
from fedtransfer.common.wire.exchange import (
    PREFIX,
    arrays_to_numpy,
    gradient_to_arrays,
    head_to_arrays,
    load_head,
    wire_bytes,
)
from fedtransfer.common.wire.protocol import FEATURE_STATS, Cfg, DPRecord, Event, Metric, Rec, site_record
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from torch import nn


def received_head(site: Site, msg: Message) -> tuple[int, ArrayRecord, ConfigRecord]:
    """The round, head and config of a server message, checked before touching data: types, fingerprint."""
    try:
        arrays, conf = instructions(msg)
    except (KeyError, ValueError, TypeError) as err:
        raise Declined(f"malformed message: {str(err)[:200]}") from None
    for key, kind in ((Cfg.SERVER_ROUND, int), (Cfg.RUN_ID, str), (Cfg.FINGERPRINT, str)):
        if type(conf.get(key)) is not kind:
            got = type(conf.get(key)).__name__
            raise Declined(f"malformed message: config {str(key)!r} must be {kind.__name__}, got {got}")
    announced = str(conf[Cfg.FINGERPRINT])
    if announced != site.backbone.fingerprint:
        raise Declined(
            f"backbone fingerprint mismatch: the server announced {announced[:16]}…, this site's "
            f"{site.backbone.name} has {site.backbone.fingerprint[:16]}…; load the same weights as the server"
        )
    record(site, msg, Event.BACKBONE_CHECKED, fingerprint=site.backbone.fingerprint)
    return int(conf[Cfg.SERVER_ROUND]), arrays, conf


def local_head(site: Site, cfg: RunConfig, arrays: ArrayRecord | None, num_classes: int) -> nn.Module:
    """A head of this run's shape with the server's weights; a head of another shape is declined.

    `arrays` None: the statistics release under SecAgg+, whose message carries the release's shape, not
    a head; the release needs only the head's size (for the plan), not its weights.
    """
    head = make_top(
        site.backbone, num_classes, hidden=cfg.head.hidden, centred=cfg.privacy.feature_stats, ft=cfg.finetune
    )
    try:
        if arrays is not None:
            load_head(head, arrays)
    except ValueError as err:
        raise Declined(str(err)) from None
    return head.to(site.backbone.device)


def privacy_plan(site: Site, cfg: RunConfig, ledger: PrivacyLedger, dim: int) -> DPPlan | None:
    """The run's DP plan for this site's data, within its policy and budget; None without DP.

    Under fedsgd, one step per round at Poisson rate q over the site's records or users; the
    feature-statistics release, when the run has one, is part of the whole-run calibration.
    Under distributed trust, the Skellam variance of the aggregate of the fewest sites SecAgg+
    unmasks (`dim`: the head's trainable coordinates, for the rounding's sensitivity).
    """
    p, t = cfg.privacy, cfg.train
    if not p.enabled:
        enforce_policy(site.policy, cfg, None, 0.0)
        return None
    share = p.feature_stats_share if p.feature_stats else None
    try:
        if p.secure_mode:
            require_secure_rng()
        units = site_units(site, cfg).count
        if cfg.secure_aggregation and t.protocol == "fedsgd" and units > cfg.secagg.max_weight:
            # γ is set for sites of up to max_weight units (SecAggConfig.quantum): refused before anything is spent
            raise ValueError(
                f"this site has {units} units, more than secagg.max_weight = {cfg.secagg.max_weight:g}; "
                "the run must raise secagg.max_weight"
            )
        if p.trust == "distributed":
            plan = _distributed_plan(site, cfg, dim, units)
        elif t.protocol == "fedsgd":
            plan = site.plan(
                plan_fedsgd,
                units,
                t.sample_rate,
                t.rounds,
                p.target_epsilon,
                p.target_delta,
                p.max_grad_norm,
                p.accountant,
                share,
                p.unit,
            )
        else:  # site.plan: a deployed site computes each plan once (client/prepared.py)
            plan = site.plan(
                plan_dp,
                len(site.train_y),
                t.batch_size,
                t.local_epochs,
                t.rounds,
                p.target_epsilon,
                p.target_delta,
                p.max_grad_norm,
                p.accountant,
                share,
            )
    except ValueError as err:  # δ ≥ 1/n for this site, or secure_mode without torchcsprng
        raise Declined(str(err)) from None
    enforce_policy(site.policy, cfg, plan, ledger.spent_in_other_runs(p.target_delta, p.accountant))
    return plan


def _distributed_plan(site: Site, cfg: RunConfig, dim: int, n: int) -> DPPlan:
    """The Skellam plan for this site's `n` units; declined when its share could wrap modulo SecAgg+'s range (see
    share_wrap_bound)."""
    p, t = cfg.privacy, cfg.train
    survivors, classes, features = cfg.secagg.fewest_survivors(t.min_sites), len(site.data.train.classes), 0
    if p.feature_stats:
        features = int(site.train_x.shape[1])
    plan = site.plan(
        plan_distributed,
        n,
        t.sample_rate,
        t.rounds,
        p.target_epsilon,
        p.target_delta,
        p.max_grad_norm,
        dim,
        survivors,
        cfg.secagg.quantum(p.max_grad_norm),
        cfg.secagg.quantum(STATS_NORM),
        p.unit,
        p.feature_stats_share if p.feature_stats else None,
        features,
        classes,
    )
    wrap = t.rounds * share_wrap_bound(n, plan.l2_sensitivity, plan.noise_share, dim, cfg.secagg.quantization_range)
    if p.feature_stats:  # the release's sums, each unit moving a coordinate by at most Δ2 of the statistics
        wrap += share_wrap_bound(
            n, plan.stats_l2, plan.stats_variance / survivors, classes * (features + 1), cfg.secagg.quantization_range
        )
    if wrap > 1e-6 * plan.target_delta:
        raise ValueError(
            f"secagg.quantization_range {cfg.secagg.quantization_range} is too small for this site's {n} "
            f"units (its noisy integer sum could wrap, probability up to {wrap:.2g}); the run must raise "
            "secagg.max_weight (a coarser γ leaves the noise more room)"
        )
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


@dataclass(frozen=True)
class Work:
    """What a site computed for a message: the arrays it sends, and what its ledger and log record."""

    arrays: ArrayRecord
    loss: float | None  # training loss for the site's own log; None for a release (no training)
    steps: int
    history: list[tuple]  # the accountant's history after this work
    step: tuple | None  # this work's accountant entry (None without DP): Opacus' triple or a Skellam round
    metrics: dict[str, float | int]
    release: str | None = None


def train(site: Site, cfg: RunConfig, msg: Message) -> RecordDict:
    """Train the head on this site's features (DP when the run says so) and reply with the head only."""
    server_round, arrays, conf = received_head(site, msg)
    if site.accept_app_version is not None and conf.get(Cfg.APP_VERSION) != site.accept_app_version:
        raise Declined(f"site pins app version {site.accept_app_version}, the run is {conf.get(Cfg.APP_VERSION)}")
    secure = is_secure(msg)  # only secaggplus_mod (see client_app._secure_mod) hands us a SecAgg+ message
    if cfg.privacy.trust == "distributed" and not secure:
        raise Declined(
            "privacy.trust: distributed: this site adds only a share of the noise, so it sends its sum "
            "only masked under secure aggregation; this training message is plain"
        )
    run_id, key = str(conf[Cfg.RUN_ID]), request_key(arrays, conf)
    cache = ReplyCache(site.replies_dir)
    if (cached := cache.load(run_id, key)) is not None:
        # a resumed coordinator repeating the round in flight: the same bytes again, no training, no new ε
        digest = update_digest(arrays_to_numpy(cached[Rec.ARRAYS]))
        record(site, msg, Event.REPLY_REPLAYED, request=key, update=digest)
        return _secure(cached, conf, cfg, replayed=True) if secure else cached
    ledger = PrivacyLedger(site.ledger_path, run_key=run_id)
    head = local_head(
        site, cfg, None if secure and conf.get(Cfg.RELEASE) is not None else arrays, len(site.data.train.classes)
    )
    plan = privacy_plan(site, cfg, ledger, sum(p.numel() for p in head.parameters()))
    started = time.monotonic()
    work = _work(site, cfg, conf, server_round, plan, ledger, head)
    answer, dp = _answer(site, work, plan, ledger, server_round, time.monotonic() - started)
    cache.save(run_id, key, answer)
    digest = update_digest(arrays_to_numpy(answer[Rec.ARRAYS]))
    logged = {"update": digest, "dp": None if dp is None else dp.as_dict(), "train_loss": work.loss}
    if work.release is not None:
        logged["release"] = work.release
    if secure:  # the plain head stays here; client_app._secure_mod logs the masked vectors that leave
        record(site, msg, Event.UPDATE_TRAINED, **logged)
        return _secure(answer, conf, cfg, replayed=False)
    record(site, msg, Event.UPDATE_SENT, **logged)
    return answer


def _work(
    site: Site,
    cfg: RunConfig,
    conf: ConfigRecord,
    server_round: int,
    plan: DPPlan | None,
    ledger: PrivacyLedger,
    head: nn.Module,
) -> Work:
    """Round 0's statistics release, a fedsgd gradient sum or fedavg's local epochs, each charged before it runs."""
    seed, secure_mode = site.round_seed(str(conf[Cfg.RUN_ID]), server_round), cfg.privacy.secure_mode
    if server_round == 0 or conf.get(Cfg.RELEASE) is not None:
        if conf.get(Cfg.RELEASE) != FEATURE_STATS or server_round != 0 or not cfg.privacy.feature_stats:
            raise Declined(
                f"round {server_round}: this run (privacy.feature_stats = {cfg.privacy.feature_stats}) "
                f"has no release {conf.get(Cfg.RELEASE)!r}"
            )
        if any(r.get("release") == FEATURE_STATS for r in ledger.entry["rounds"]):
            raise Declined("feature statistics were already released in this run; a second release is refused")
        step = None if plan is None else plan.stats_step
        if plan is not None:
            ledger.check_round(plan, step)
        units, classes = site_units(site, cfg), len(site.data.train.classes)
        generator = make_generator(seed, secure_mode, site.train_x.device)
        if plan is not None and plan.distributed:  # integers in units of each tensor's quantum, plus a Skellam share
            released = skellam_statistics(
                site.train_x,
                site.train_y,
                classes,
                units,
                plan.stats_variance / plan.min_survivors,
                generator,
                plan.stats_quantum,
            )
        else:
            released = release_statistics(
                site.train_x,
                site.train_y,
                classes,
                units,
                None if plan is None else plan.stats_noise_multiplier,
                generator,
                secure_mode,
            )
        return Work(
            ArrayRecord(released),
            None,
            1,
            _extended(ledger, step),
            step,
            {Metric.NUM_EXAMPLES: units.count},
            FEATURE_STATS,
        )
    if plan is not None:
        ledger.check_round(plan)
    if cfg.train.protocol == "fedsgd":
        return _gradient_sum(site, cfg, plan, ledger, head, seed)
    t = cfg.train
    opts = LocalTraining(
        t.local_epochs, t.batch_size, t.learning_rate, t.momentum, float(conf.get(Cfg.PROXIMAL_MU, 0.0))
    )
    outcome = train_head(
        head, site.train_x, site.train_y, opts, plan, ledger.history, seed=seed, secure_mode=secure_mode
    )
    step = None if plan is None else (plan.noise_multiplier, plan.sample_rate, outcome.steps)
    return Work(
        head_to_arrays(head.cpu()),
        outcome.loss,
        outcome.steps,
        outcome.history,
        step,
        {Metric.NUM_EXAMPLES: len(site.train_y)},
    )


def _gradient_sum(
    site: Site, cfg: RunConfig, plan: DPPlan | None, ledger: PrivacyLedger, head: nn.Module, seed: int
) -> Work:
    """fedsgd: the noisy sum of clipped per-unit gradients, and the public expected batch size q·n.

    Under distributed trust the sum is of integers (each unit's clipped gradient in units of γ,
    rounded) plus this site's Skellam share μ/K_min, times γ (a power of two: exact) in float64.
    """
    units, q, secure_mode = site_units(site, cfg), cfg.train.sample_rate, cfg.privacy.secure_mode
    generator = make_generator(seed, secure_mode, site.train_x.device)
    distributed = plan is not None and plan.distributed
    clipped = clipped_gradient_sum(
        head,
        site.train_x,
        site.train_y,
        units,
        q,
        None if plan is None else plan.max_grad_norm,
        generator,
        plan.quantum if distributed else None,
    )
    frozen = frozenset(k for k, _ in head.named_buffers())  # no gradient, nothing to hide: sent as zeros
    if distributed:
        noisy = {
            k: v if k in frozen else v + sample(v.shape, plan.noise_share, generator, v.device)
            for k, v in clipped.sums.items()
        }
        arrays = _exact_arrays(head, {k: v * plan.quantum for k, v in noisy.items()})  # back in gradient units
    else:
        std = 0.0 if plan is None else plan.noise_multiplier * plan.max_grad_norm
        arrays = gradient_to_arrays(head, add_noise(clipped.sums, std, generator, secure_mode, skip=frozen))
    step = None if plan is None else plan.round_step
    return Work(
        arrays,
        clipped.loss,
        1,
        _extended(ledger, step),
        step,
        {Metric.NUM_EXAMPLES: units.count, Metric.EXPECTED_BATCH: q * units.count},
    )


def _exact_arrays(head: nn.Module, sums: dict[str, torch.Tensor]) -> ArrayRecord:
    """A gradient sum of integer multiples of γ, named and shaped like the head, in float64 (float32 is not exact)."""
    as_head = gradient_to_arrays(head, sums)  # names and shapes checked there
    return ArrayRecord(
        {PREFIX + k: sums[k].detach().cpu().double().reshape(as_head[PREFIX + k].shape) for k in head.state_dict()}
    )


def _extended(ledger: PrivacyLedger, step: tuple | None) -> list[tuple]:
    return ledger.history if step is None else [*ledger.history, step]


def _answer(
    site: Site, work: Work, plan: DPPlan | None, ledger: PrivacyLedger, server_round: int, seconds: float
) -> tuple[RecordDict, DPRecord | None]:
    """The reply: the arrays, metrics, site identity and, under DP, this work's DP parameters (ledger first)."""
    metrics = {
        **work.metrics,
        Metric.STEPS: work.steps,
        Metric.WIRE_BYTES: wire_bytes(work.arrays),
        Metric.TRAIN_SECONDS: round(seconds, 4),
    }
    answer = RecordDict({Rec.ARRAYS: work.arrays, Rec.SITE: site_record(site.name)})
    if plan is None or work.step is None:
        # without DP nothing is promised, and the loss helps; under DP it would be an unaccounted release
        if work.loss is not None:
            metrics[Metric.TRAIN_LOSS] = work.loss
        answer[Rec.METRICS] = MetricRecord(metrics)
        return answer, None
    dp = _dp_record(work, plan)
    metrics[Metric.EPSILON] = ledger.record_round(server_round, plan, work.history, work.release)
    if plan.distributed:  # the second ε: against this site's own message, were secure aggregation bypassed
        metrics[Metric.EPSILON_INDIVIDUAL] = epsilon_of(work.history, plan.target_delta, plan.accountant, True)
    answer[Rec.METRICS] = MetricRecord(metrics)
    answer[Rec.DP] = dp.to_record()
    return answer, dp


def _dp_record(work: Work, plan: DPPlan) -> DPRecord:
    """This work's DP parameters; a Skellam round also names the variance of the share this site added."""
    if plan.distributed and work.release is None:
        return DPRecord(
            plan.noise_multiplier,
            plan.sample_rate,
            work.steps,
            plan.max_grad_norm,
            plan.target_delta,
            plan.accountant,
            "skellam",
            plan.noise_variance,
            plan.noise_share,
            plan.min_survivors,
            plan.quantum,
            plan.l1_sensitivity,
            plan.l2_sensitivity,
        )
    if plan.distributed:  # the statistics' Skellam release: its own norm bound, quantum and sensitivities
        return DPRecord(
            plan.stats_noise_multiplier or 0.0,
            1.0,
            1,
            STATS_NORM,
            plan.target_delta,
            plan.accountant,
            "skellam",
            plan.stats_variance,
            plan.stats_variance / plan.min_survivors,
            plan.min_survivors,
            plan.stats_quantum,
            plan.stats_l1,
            plan.stats_l2,
        )
    sigma, q, steps = work.step
    clip = 1.0 if work.release else plan.max_grad_norm  # the statistics' sensitivity is 1 (unit features, counts)
    return DPRecord(sigma, q, steps, clip, plan.target_delta, plan.accountant)


def _secure(answer: RecordDict, conf: ConfigRecord, cfg: RunConfig, replayed: bool) -> RecordDict:
    """Our reply in the form secaggplus_mod masks; a head SecAgg+ would clip silently is declined."""
    try:
        names = head_names(conf)
        quanta = secure_sum_quanta(cfg, names, conf.get(Cfg.RELEASE) is not None)
        return secure_reply(answer, names, cfg.secagg, replayed, quanta)
    except ValueError as err:
        raise Declined(str(err)) from None
