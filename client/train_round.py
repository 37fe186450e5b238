"""A site's answer to a training message: check it, charge the privacy budget, train, reply.

The order is the promise. The server's message is checked before any data is touched.
The budget is checked against the site's ledger before training, and the ledger records
the round before the reply is cached and logged: a crash in between can only over-count
ε, never send an update that was not charged. What leaves the site is built from the
head alone (`common.exchange.head_to_arrays`), with the DP parameters in a `DPRecord`.
"""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from torch import nn

from client.replay import ReplyCache, request_key
from client.secure import head_names, instructions, is_secure, secure_reply
from client.site import Declined, Site, enforce_policy
from client.site_log import record
from common.audit_log import update_digest
from common.config import RunConfig
from common.dp_training import LocalTraining, TrainOutcome, train_head
from common.exchange import arrays_to_numpy, head_to_arrays, load_head, wire_bytes
from common.head import make_head
from common.privacy import DPPlan, PrivacyLedger, plan_dp, require_secure_rng
from common.protocol import Cfg, DPRecord, Event, Metric, Rec, site_record


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


def local_head(site: Site, cfg: RunConfig, arrays: ArrayRecord, num_classes: int) -> nn.Module:
    """A head of this run's shape with the server's weights; a head of another shape is declined."""
    head = make_head(site.backbone.feature_dim, num_classes, cfg.head.hidden)
    try:
        load_head(head, arrays)
    except ValueError as err:
        raise Declined(str(err)) from None
    return head.to(site.backbone.device)


def privacy_plan(site: Site, cfg: RunConfig, ledger: PrivacyLedger) -> DPPlan | None:
    """The run's DP plan for this site's data, within its policy and budget; None without DP."""
    p, t = cfg.privacy, cfg.train
    if not p.enabled:
        enforce_policy(site.policy, cfg, None, 0.0)
        return None
    try:
        if p.secure_mode:
            require_secure_rng()
        plan = plan_dp(len(site.train_y), t.batch_size, t.local_epochs, t.rounds, p.target_epsilon, p.target_delta,
                       p.max_grad_norm, p.accountant)  # fmt: skip
    except ValueError as err:  # δ ≥ 1/n for this site, or secure_mode without torchcsprng
        raise Declined(str(err)) from None
    enforce_policy(site.policy, cfg, plan, ledger.spent_in_other_runs(p.target_delta, p.accountant))
    ledger.check_round(plan)
    return plan


def train(site: Site, cfg: RunConfig, msg: Message) -> RecordDict:
    """Train the head on this site's features (DP when the run says so) and reply with the head only."""
    server_round, arrays, conf = received_head(site, msg)
    if site.accept_app_version is not None and conf.get(Cfg.APP_VERSION) != site.accept_app_version:
        raise Declined(f"site pins app version {site.accept_app_version}, the run is {conf.get(Cfg.APP_VERSION)}")
    secure = is_secure(msg)  # only secaggplus_mod (see client_app._secure_mod) hands us a SecAgg+ message
    run_id, key = str(conf[Cfg.RUN_ID]), request_key(arrays, conf)
    cache = ReplyCache(site.replies_dir)
    if (cached := cache.load(run_id, key)) is not None:
        # a resumed coordinator repeating the round in flight: the same bytes again, no training, no new ε
        digest = update_digest(arrays_to_numpy(cached[Rec.ARRAYS]))
        record(site, msg, Event.REPLY_REPLAYED, request=key, update=digest)
        return _secure(cached, conf, cfg, replayed=True) if secure else cached
    ledger = PrivacyLedger(site.ledger_path, run_key=run_id)
    plan = privacy_plan(site, cfg, ledger)
    head = local_head(site, cfg, arrays, len(site.data.train.classes))
    t = cfg.train
    opts = LocalTraining(t.local_epochs, t.batch_size, t.learning_rate, t.momentum,
                         float(conf.get(Cfg.PROXIMAL_MU, 0.0)))  # fmt: skip
    started = time.monotonic()
    outcome = train_head(head, site.train_x, site.train_y, opts, plan, ledger.history,
                         seed=site.round_seed(run_id, server_round), secure_mode=cfg.privacy.secure_mode)  # fmt: skip
    answer, dp = _answer(site, head, plan, outcome, ledger, server_round, time.monotonic() - started)
    cache.save(run_id, key, answer)
    digest = update_digest(arrays_to_numpy(answer[Rec.ARRAYS]))
    logged = {"update": digest, "dp": None if dp is None else dp.as_dict(), "train_loss": outcome.loss}
    if secure:  # the plain head stays here; client_app._secure_mod logs the masked vectors that leave
        record(site, msg, Event.UPDATE_TRAINED, **logged)
        return _secure(answer, conf, cfg, replayed=False)
    record(site, msg, Event.UPDATE_SENT, **logged)
    return answer


def _answer(
    site: Site, head: nn.Module, plan: DPPlan | None, outcome: TrainOutcome, ledger: PrivacyLedger, server_round: int,
    seconds: float,
) -> tuple[RecordDict, DPRecord | None]:  # fmt: skip
    """The reply: head, metrics, site identity and, under DP, the round's DP parameters (ledger first)."""
    arrays = head_to_arrays(head.cpu())
    metrics = {Metric.NUM_EXAMPLES: len(site.train_y), Metric.STEPS: outcome.steps,
               Metric.WIRE_BYTES: wire_bytes(arrays), Metric.TRAIN_SECONDS: round(seconds, 4)}  # fmt: skip
    answer = RecordDict({Rec.ARRAYS: arrays, Rec.SITE: site_record(site.name)})
    if plan is None:
        # without DP nothing is promised, and the loss helps; under DP it would be an unaccounted release
        metrics[Metric.TRAIN_LOSS] = outcome.loss
        answer[Rec.METRICS] = MetricRecord(metrics)
        return answer, None
    dp = DPRecord(plan.noise_multiplier, plan.sample_rate, outcome.steps, plan.max_grad_norm, plan.target_delta,
                  plan.accountant)  # fmt: skip
    metrics[Metric.EPSILON] = ledger.record_round(server_round, plan, outcome.history)
    answer[Rec.METRICS] = MetricRecord(metrics)
    answer[Rec.DP] = dp.to_record()
    return answer, dp


def _secure(answer: RecordDict, conf: ConfigRecord, cfg: RunConfig, replayed: bool) -> RecordDict:
    """Our reply in the form secaggplus_mod masks; a head SecAgg+ would clip silently is declined."""
    try:
        return secure_reply(answer, head_names(conf), cfg.secagg, replayed)
    except ValueError as err:
        raise Declined(str(err)) from None
