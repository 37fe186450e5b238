"""The ClientApp: a site trains the head on its cached features under DP and sends only the head.

Every refusal (budget spent, backbone mismatch, policy, bad data, malformed message) is
answered with an error reply that names the site and the reason, so the server logs it
and carries on with the other sites instead of a site crashing.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from client.replay import ReplyCache, request_key
from client.secure import Refused, config_of, head_names, instructions, is_secure, secure_reply, take_handoff
from client.site import Declined, Site, enforce_policy, get_site
from client.training import LocalTraining, train_head
from common.audit_log import AuditLog, update_digest
from common.backbones import BackboneError
from common.config import ConfigError, RunConfig, config_from_run_config
from common.data import DataError
from common.exchange import arrays_to_numpy, head_to_arrays, load_head, masked_arrays, wire_bytes
from common.head import evaluate_head, make_head
from common.privacy import BudgetExceeded, PrivacyLedger, plan_dp, require_secure_rng

DECLINED = 4001  # error code of a refusal by the site (budget, policy, mismatch)


def _secure_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """SecAgg+ messages go through Flower's secaggplus_mod, which masks the head our handler returns.

    What leaves the site in secure mode is the masked vector: that is what the site's audit
    log records as sent (the plain head stays in its update-trained record, on its own disk).
    """
    if msg.metadata.message_type != MessageType.TRAIN or not is_secure(msg):
        return call_next(msg, context)

    def handler(m: Message, c: Context) -> Message:
        reply = call_next(m, c)
        if reply.has_error():
            raise Refused(reply)
        return reply

    try:
        reply = secaggplus_mod(msg, context, handler)
    except Refused as refused:
        return refused.reply
    if (replayed := take_handoff(reply)) is not None:
        names = head_names(config_of(msg))
        vectors = [bytes_to_ndarray(b) for b in reply.content[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        site = get_site(context, config_from_run_config(context.run_config))
        masked = update_digest(masked_arrays(vectors, names))
        # the round's DP parameters are in the update-trained record of the training itself
        _audit(site, msg, "update-sent", update=masked, dp=None, masked=True, replayed=replayed)
    return reply


app = ClientApp(mods=[_secure_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _answer(msg, context, _train)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _answer(msg, context, _evaluate)


def _answer(msg: Message, context: Context, handler: Callable[[Site, RunConfig, Message], RecordDict]) -> Message:
    name = str(context.node_config.get("partition-id", context.node_config.get("site-config", "site")))
    site = None
    try:
        cfg = config_from_run_config(context.run_config)
        site = get_site(context, cfg)
        name = site.name
        return Message(handler(site, cfg, msg), reply_to=msg)
    except (Declined, BudgetExceeded, ConfigError, DataError, BackboneError, ValueError, KeyError, TypeError) as err:
        reason = str(err) if not isinstance(err, KeyError) else f"message lacks {err}"
        if site is not None:
            _audit(site, msg, "declined", reason=reason)
        return Message(Error(code=DECLINED, reason=f"{name}: {reason}"), reply_to=msg)


def _audit(site: Site, msg: Message, event: str, **fields: object) -> None:
    """Append to the site's own hash-chained audit log (on its disk, never sent)."""
    conf = config_of(msg)
    rnd = conf.get("server-round")
    AuditLog(site.audit_path).append(
        event,
        site=site.name,
        run_id=str(conf.get("run-id", "")),
        round=rnd if type(rnd) is int else None,  # a malformed message is logged too, as it came
        message_type=msg.metadata.message_type,
        **fields,
    )


def _received_head(site: Site, cfg: RunConfig, msg: Message) -> tuple[int, ArrayRecord, ConfigRecord]:
    """Check the server's message before touching data: round, fingerprint, head shape."""
    arrays, conf = instructions(msg)
    for key, kind in (("server-round", int), ("run-id", str), ("backbone-fingerprint", str)):
        if type(conf[key]) is not kind:
            raise Declined(f"malformed message: config {key!r} must be {kind.__name__}, got {type(conf[key]).__name__}")
    announced = conf["backbone-fingerprint"]
    if announced != site.backbone.fingerprint:
        raise Declined(
            f"backbone fingerprint mismatch: the server announced {str(announced)[:16]}…, this site's "
            f"{site.backbone.name} has {site.backbone.fingerprint[:16]}…; load the same weights as the server"
        )
    _audit(site, msg, "backbone-checked", fingerprint=site.backbone.fingerprint)
    return int(conf["server-round"]), arrays, conf


def _train(site: Site, cfg: RunConfig, msg: Message) -> RecordDict:
    server_round, arrays, conf = _received_head(site, cfg, msg)
    if site.accept_app_version is not None and conf.get("app-version") != site.accept_app_version:
        raise Declined(f"site pins app version {site.accept_app_version}, the run is {conf.get('app-version')}")
    secure = is_secure(msg)  # only secaggplus_mod (see _secure_mod) hands the handler a SecAgg+ message
    if site.policy is not None and site.policy.require_secure_aggregation and not secure:
        raise Declined("site policy requires secure aggregation (policy.require_secure_aggregation), the run has "
                       "secure_aggregation: false")  # fmt: skip
    run_id, key = str(conf["run-id"]), request_key(arrays, conf)
    cache = ReplyCache(site.replies_dir)
    if (cached := cache.load(run_id, key)) is not None:
        # a resumed coordinator repeating the round in flight: the same bytes again, no training, no new ε
        _audit(site, msg, "reply-replayed", request=key, update=update_digest(arrays_to_numpy(cached["arrays"])))
        return secure_reply(cached, head_names(conf), cfg.secagg, True) if secure else cached
    head = make_head(site.backbone.feature_dim, len(site.data.train.classes), cfg.head.hidden)
    load_head(head, arrays)
    head.to(site.backbone.device)
    p, t = cfg.privacy, cfg.train
    plan = None
    ledger = PrivacyLedger(site.ledger_path, run_key=run_id)
    if p.enabled:
        if p.secure_mode:
            require_secure_rng()
        n = len(site.train_y)
        plan = plan_dp(n, t.batch_size, t.local_epochs, t.rounds, p.target_epsilon, p.target_delta, p.max_grad_norm,
                       p.accountant)  # fmt: skip
        enforce_policy(site.policy, cfg, plan, ledger.spent_in_other_runs(p.target_delta, p.accountant))
        ledger.check_round(plan)
    else:
        enforce_policy(site.policy, cfg, None, 0.0)
    opts = LocalTraining(t.local_epochs, t.batch_size, t.learning_rate, t.momentum, float(conf.get("proximal-mu", 0.0)))
    started = time.monotonic()
    outcome = train_head(
        head, site.train_x, site.train_y, opts, plan, ledger.history,
        seed=site.round_seed(run_id, server_round), secure_mode=p.secure_mode,
    )  # fmt: skip
    reply = head_to_arrays(head.cpu())
    # the DP parameters go in the site's own log, so an auditor can recompute ε without trusting the server's copy
    dp = None if plan is None else {"noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate,
                                    "steps": outcome.steps, "clip_norm": plan.max_grad_norm,
                                    "delta": plan.target_delta, "accountant": plan.accountant}  # fmt: skip
    # the training loss is a statistic of private data that DP does not cover: it stays in the site's own log
    metrics = {"num-examples": len(site.train_y), "steps": outcome.steps, "wire-bytes": wire_bytes(reply),
               "train-seconds": round(time.monotonic() - started, 4)}  # fmt: skip
    if plan is None:
        metrics["train-loss"] = outcome.loss
    if plan is not None:
        epsilon = ledger.record_round(server_round, plan, outcome.history)
        metrics |= {"epsilon": epsilon, "delta": plan.target_delta, "noise-multiplier": plan.noise_multiplier,
                    "sample-rate": plan.sample_rate, "clip-norm": plan.max_grad_norm}  # fmt: skip
    answer = RecordDict(
        {"arrays": reply, "metrics": MetricRecord(metrics),
         "site": ConfigRecord({"name": site.name, "accountant": plan.accountant if plan else "none"})}
    )  # fmt: skip
    # ledger, then cache, then log: a crash in between can only over-count ε, never send an uncharged update
    cache.save(run_id, key, answer)
    if secure:  # the plain head stays here; _secure_mod logs the masked vectors that leave
        _audit(site, msg, "update-trained", update=update_digest(arrays_to_numpy(reply)), dp=dp,
               train_loss=outcome.loss)  # fmt: skip
        return secure_reply(answer, head_names(conf), cfg.secagg, False)
    _audit(site, msg, "update-sent", update=update_digest(arrays_to_numpy(reply)), dp=dp, train_loss=outcome.loss)
    return answer


def _evaluate(site: Site, cfg: RunConfig, msg: Message) -> RecordDict:
    _, arrays, _ = _received_head(site, cfg, msg)
    head = make_head(site.backbone.feature_dim, len(site.data.test.classes), cfg.head.hidden)
    load_head(head, arrays)
    loss, acc = evaluate_head(head.to(site.backbone.device), site.test_x, site.test_y)
    metrics = MetricRecord({"num-examples": len(site.test_y), "eval-loss": loss, "eval-accuracy": acc})
    return RecordDict({"metrics": metrics, "site": ConfigRecord({"name": site.name})})
