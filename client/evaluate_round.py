"""A site's evaluation of a global model: its statistics on the site's test split, as a DP release.

It is asked for in the next round's training message (`carried_evaluation`: the head received is scored
before training, and the training reply carries the release), or, for the final model, in an evaluation
message of its own (`evaluate`). Either way the release is the model round's: charged, seeded and logged
as that round's, so the same model gives the same statistics whichever message carried it.

What leaves is `common/privacy/evaluation.py`'s release: noisy counts, a clipped loss sum and score
histograms, never a plain metric. Under distributed trust a release a training message carries is instead
the integer statistics plus a Skellam share, which leave only masked by SecAgg+ (client/evaluate_masked.py);
the final model's, in its own message, stays the Gaussian release. Under DP it is charged to the site's
ledger (the evaluation's own history, apart from training's: test and training records are disjoint) before
it is logged and sent.
The personal model's scores are not sent: with `personal.dp: false` that model is a non-private function of
the training records, so its score on test records would be covered by neither budget; they stay in
the site's own audit log (`personal-scored`) and report.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from fedtransfer.client.evaluate_masked import evaluation_releases, masked_plan
from fedtransfer.client.received import local_head, received_head
from fedtransfer.client.replay import ReplyCache, request_key
from fedtransfer.client.site import Declined, Site
from fedtransfer.client.site_log import record
from fedtransfer.client.site_model.personal import personal_scores
from fedtransfer.common.config.run import RunConfig
from fedtransfer.common.model.head import evaluate_head
from fedtransfer.common.privacy.calibration import epsilon_of
from fedtransfer.common.privacy.coverage import sent_values
from fedtransfer.common.privacy.evaluation import (
    EVALUATION,
    EvaluationPlan,
    evaluation_statistics,
    plan_evaluation,
    release_evaluation,
)
from fedtransfer.common.privacy.evaluation_skellam import check_wrap, integer_statistics, share_values
from fedtransfer.common.privacy.fedsgd import Units, make_generator
from fedtransfer.common.privacy.ledger import BudgetExceeded, PrivacyLedger
from fedtransfer.common.privacy.mechanisms import mechanism_for
from fedtransfer.common.storage.audit_log import update_digest
from fedtransfer.common.wire.exchange import arrays_to_numpy
from fedtransfer.common.wire.protocol import Cfg, DPRecord, Event, Metric, Rec, site_record
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

EVAL_SEED_SALT = 0x6576616C  # "eval": the evaluation's noise is never a training round's noise
PARALLEL = "parallel"  # test and training records disjoint: the evaluation's ε does not add to training's
EVALUATIONS = "evaluations"  # the standalone evaluation's reply cache: a folder of its own beside training's


def evaluate(site: Site, cfg: RunConfig, msg: Message) -> RecordDict:
    """Score the received head on this site's test split and reply with the (noisy) statistics only.

    The standalone exchange: the final model's, after the last round (each round's other models are scored in
    the next round's training message, `carried_evaluation`). Its reply is cached like a training reply
    (client/replay.py): a resumed coordinator repeating it gets the same bytes, charged once.
    """
    server_round, arrays, conf = received_head(site, msg)
    run_id, key = str(conf[Cfg.RUN_ID]), request_key(arrays, conf)
    cache = ReplyCache(site.replies_dir / EVALUATIONS)
    if (cached := cache.load(run_id, key)) is not None:
        digest = update_digest(arrays_to_numpy(cached[Rec.EVALUATION]))
        record(site, msg, Event.REPLY_REPLAYED, request=key, statistics=digest, release=EVALUATION)
        return cached
    head = local_head(site, cfg, arrays, len(site.data.test.classes))
    answer, logged = scored(site, cfg, msg, head, run_id=run_id, model_round=server_round)
    answer[Rec.SITE] = site_record(site.name)
    cache.save(run_id, key, answer)
    logged["sent"] = sent_values(answer)  # every value that leaves, for the audit's coverage check
    record(site, msg, Event.EVALUATION_SENT, **logged)
    return answer


def carried_evaluation(
    site: Site,
    cfg: RunConfig,
    msg: Message,
    *,
    head: torch.nn.Module,
    conf: ConfigRecord,
    server_round: int,
    ledger: PrivacyLedger,
    masked: bool | None = None,
) -> RecordDict | None:
    """The evaluation a training message asks for (Cfg.EVALUATE_ROUND), of the head it carries, before training.

    The head is the model of round server_round − 1, so the release is that round's: its ledger entry, its
    seed (the same statistics the standalone exchange would give that model) and its log record. A site
    that declines it (evaluation budget, a person on both sides of its split) logs why and still trains:
    the two releases have separate budgets. None when the message asks for none or the site declines.
    `ledger`: the training's own ledger object, so that its later write keeps this charge. `masked`
    (client/evaluate_masked.py `masked_evaluation`): True, the release is a Skellam share for the round's masked
    slots; False, distributed trust without slots, declined (a share never leaves unmasked); None, Gaussian.
    """
    if (asked := conf.get(Cfg.EVALUATE_ROUND)) is None:
        return None
    if type(asked) is not int or asked != server_round - 1:
        raise Declined(
            f"malformed message: config {str(Cfg.EVALUATE_ROUND)!r} must be {server_round - 1}, the round of the "
            f"head it carries, got {asked!r:.40}"
        )
    try:
        if masked is False:
            raise Declined(
                "privacy.trust: distributed: the evaluation is a Skellam share sent only masked, and this SecAgg+ "
                "round holds no slots for it"
            )
        answer, logged = scored(
            site,
            cfg,
            msg,
            copy.deepcopy(head),
            run_id=str(conf[Cfg.RUN_ID]),
            model_round=asked,
            ledger=ledger,
            masked=bool(masked),
        )
    except (Declined, BudgetExceeded) as err:
        record(site, msg, Event.EVALUATION_DECLINED, as_round=asked, reason=str(err))
        return None
    logged["sent"] = sent_values(answer)  # this release's values; the training record lists the whole reply
    record(site, msg, Event.EVALUATION_SENT, as_round=asked, carried_by="training", **logged)
    return answer


def scored(
    site: Site,
    cfg: RunConfig,
    msg: Message,
    head: torch.nn.Module,
    *,
    run_id: str,
    model_round: int,
    ledger: PrivacyLedger | None = None,
    masked: bool = False,
) -> tuple[RecordDict, dict[str, object]]:
    """The evaluation release of `head` (the model of `model_round`) as reply records, and its log fields.

    Personal models are trained and scored here too (once per round, kept in the site's own log).
    """
    released, dp, epsilon, individual = evaluation_release(
        site, cfg, head, run_id=run_id, server_round=model_round, ledger=ledger, masked=masked
    )
    if model_round > 0 and (own := personal_scores(site, cfg, head, msg, run_id, model_round)) is not None:
        theirs = evaluate_head(head, site.test_x, site.test_y)  # the site's own comparison, in its own log only
        record(
            site, msg, Event.PERSONAL_SCORED, as_round=model_round, personal=own.accuracy, global_model=theirs.accuracy
        )
    answer = RecordDict({Rec.EVALUATION: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in released.items()})})
    logged: dict[str, object] = {"statistics": update_digest(released), "release": EVALUATION, "dp": None}
    if dp is not None:
        answer[Rec.EVALUATION_DP] = ConfigRecord(dp.as_dict() | {"composition": PARALLEL})
        answer[Rec.METRICS] = MetricRecord({Metric.EVAL_EPSILON: epsilon})
        logged |= {"dp": dp.as_dict(), "composition": PARALLEL, "epsilon": epsilon}
        if individual is not None:  # distributed trust's second ε: against this site's own messages
            answer[Rec.METRICS][Metric.EVAL_EPSILON_INDIVIDUAL] = individual
            logged["epsilon_individual"] = individual
    return answer, logged


def evaluation_plan(site: Site, cfg: RunConfig) -> EvaluationPlan | None:
    """The run's evaluation plan (None without DP): σ for every evaluation the run may ask for."""
    p = cfg.privacy
    if not p.enabled:
        return None
    if p.target_delta >= 1.0 / max(test_units(site, cfg).count, 1):
        raise Declined(
            f"privacy.target_delta {p.target_delta:g} is not below 1/n for this site's {len(site.test_y)} test "
            "records; its evaluation cannot be released (lower target_delta)"
        )
    return plan_evaluation(
        releases=evaluation_releases(cfg),
        target_epsilon=p.evaluation_budget,
        target_delta=p.target_delta,
        accountant=p.accountant,
    )


def test_units(site: Site, cfg: RunConfig) -> Units:
    """The test split's units: records, or persons under privacy.unit: user.

    Parallel composition needs every person on one side of the split: a person with records in both
    would be protected by neither budget alone, so such a site declines to evaluate (split by person).
    """
    if cfg.privacy.unit != "user" or site.data.test.users is None:
        return Units.records(len(site.test_y))  # synthetic users group training records only
    train, test = site.data.train, site.data.test
    if train.users is not None and (both := set(train.users.astype(str)) & set(test.users.astype(str))):
        raise Declined(
            f"privacy.unit: user, but {len(both)} person(s) have records in both this site's training and test "
            "splits, so the evaluation's ε would add to training's; split the site's data by person"
        )
    return Units.of_users(torch.from_numpy(test.user_codes()))


def evaluation_release(
    site: Site,
    cfg: RunConfig,
    head: torch.nn.Module,
    *,
    run_id: str,
    server_round: int,
    ledger: PrivacyLedger | None = None,
    masked: bool = False,
) -> tuple[dict[str, np.ndarray], DPRecord | None, float, float | None]:
    """The released statistics, their DP record, the evaluation ε so far and (under distributed trust) ε against
    the site's own messages, charged before they are returned.

    A function of (model, test split, plan) alone, so that a training reply carries it too; `ledger`: the
    site's ledger object already open for this message (one object, one write order), else read here.
    `masked`: the Skellam share for SecAgg+'s slots (client/evaluate_masked.py) instead of the Gaussian release.
    """
    plan = evaluation_plan(site, cfg)
    units = test_units(site, cfg)
    if masked and plan is not None:
        return _masked_release(site, cfg, head, units, run_id=run_id, server_round=server_round, ledger=ledger)
    stats = evaluation_statistics(head, site.test_x, site.test_y, len(site.data.test.classes), units)
    ledger = ledger or PrivacyLedger(site.ledger_path, run_key=run_id)
    epsilon = 0.0
    if plan is not None:
        p = cfg.privacy
        args = {"delta": p.target_delta, "accountant": p.accountant}
        ledger.check_evaluation(plan.event, target_epsilon=plan.target_epsilon, **args)
        epsilon = ledger.record_evaluation(server_round, plan.event, plan=plan.as_dict(), **args)
    seed = site.round_seed(run_id, server_round) ^ EVAL_SEED_SALT
    generator = make_generator(seed, cfg.privacy.secure_mode, torch.device("cpu"))
    released = release_evaluation(stats, plan, generator, cfg.privacy.secure_mode)
    if plan is None:
        return released, None, epsilon, None
    dp = DPRecord(plan.noise_multiplier, 1.0, 1, 1.0, plan.target_delta, plan.accountant)
    individual = None  # distributed trust: ε against the site's own messages too (the same for Gaussian ones)
    if mechanism_for(cfg).distributed:
        individual = epsilon_of(ledger.evaluation_history, plan.target_delta, plan.accountant, True)
    return released, dp, epsilon, individual


def _masked_release(
    site: Site,
    cfg: RunConfig,
    head: torch.nn.Module,
    units: Units,
    *,
    run_id: str,
    server_round: int,
    ledger: PrivacyLedger | None,
) -> tuple[dict[str, np.ndarray], DPRecord, float, float]:
    """The integer statistics plus this site's Skellam share, in units of the statistics (times γ_e), charged
    first as one Skellam release of the aggregate's variance (common/privacy/evaluation_skellam.py)."""
    num_classes = len(site.data.test.classes)
    plan = masked_plan(cfg, num_classes)
    if (why := check_wrap(plan, units.count, cfg.secagg.quantization_range)) is not None:
        raise Declined(why)
    ledger = ledger or PrivacyLedger(site.ledger_path, run_key=run_id)
    args = {"delta": plan.target_delta, "accountant": plan.accountant}
    ledger.check_evaluation(plan.event, target_epsilon=plan.target_epsilon, **args)
    epsilon = ledger.record_evaluation(server_round, plan.event, plan=plan.as_dict(), **args)
    individual = epsilon_of(ledger.evaluation_history, plan.target_delta, plan.accountant, True)
    integers = integer_statistics(head, site.test_x, site.test_y, num_classes, units, plan.quantum)
    seed = site.round_seed(run_id, server_round) ^ EVAL_SEED_SALT
    generator = make_generator(seed, cfg.privacy.secure_mode, torch.device("cpu"))
    return share_values(integers, plan, num_classes, generator), plan.record(), epsilon, individual
