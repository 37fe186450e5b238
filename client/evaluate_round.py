"""A site's answer to an evaluation message: the global model's statistics on its test split, as a DP release.

What leaves is `common/privacy/evaluation.py`'s release: noisy counts, a clipped loss sum and score
histograms, never a plain metric. Under DP it is charged to the site's ledger (the evaluation's own
history, apart from training's: test and training records are disjoint) before it is logged and sent.
The personal model's scores are not sent: with `personal.dp: false` that model is a non-private function of
the training records, so its score on test records would be covered by neither budget; they stay in
the site's own audit log (`personal-scored`) and report.
"""

from __future__ import annotations

import numpy as np
import torch
from fedtransfer.client import train_round
from fedtransfer.client.site import Declined, Site
from fedtransfer.client.site_log import record
from fedtransfer.client.site_model.personal import personal_scores
from fedtransfer.common.config.run import RunConfig
from fedtransfer.common.model.head import evaluate_head
from fedtransfer.common.privacy.coverage import sent_values
from fedtransfer.common.privacy.evaluation import (
    EVALUATION,
    EvaluationPlan,
    evaluation_statistics,
    plan_evaluation,
    release_evaluation,
)
from fedtransfer.common.privacy.fedsgd import Units, make_generator
from fedtransfer.common.privacy.ledger import PrivacyLedger
from fedtransfer.common.storage.audit_log import update_digest
from fedtransfer.common.wire.protocol import Cfg, DPRecord, Event, Metric, Rec, site_record
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

EVAL_SEED_SALT = 0x6576616C  # "eval": the evaluation's noise is never a training round's noise
PARALLEL = "parallel"  # test and training records disjoint: the evaluation's ε does not add to training's


def evaluate(site: Site, cfg: RunConfig, msg: Message) -> RecordDict:
    """Score the received head on this site's test split and reply with the (noisy) statistics only."""
    server_round, arrays, conf = train_round.received_head(site, msg)
    run_id = str(conf[Cfg.RUN_ID])
    head = train_round.local_head(site, cfg, arrays, len(site.data.test.classes))
    released, dp, epsilon = evaluation_release(site, cfg, head, run_id=run_id, server_round=server_round)
    if server_round > 0 and (own := personal_scores(site, cfg, head, msg, run_id, server_round)) is not None:
        theirs = evaluate_head(head, site.test_x, site.test_y)  # the site's own comparison, in its own log only
        record(site, msg, Event.PERSONAL_SCORED, personal=own.accuracy, global_model=theirs.accuracy)
    answer = RecordDict(
        {
            Rec.EVALUATION: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in released.items()}),
            Rec.SITE: site_record(site.name),
        }
    )
    logged: dict[str, object] = {"statistics": update_digest(released), "release": EVALUATION, "dp": None}
    if dp is not None:
        answer[Rec.EVALUATION_DP] = ConfigRecord(dp.as_dict() | {"composition": PARALLEL})
        answer[Rec.METRICS] = MetricRecord({Metric.EVAL_EPSILON: epsilon})
        logged |= {"dp": dp.as_dict(), "composition": PARALLEL, "epsilon": epsilon}
    logged["sent"] = sent_values(answer)  # every value that leaves, for the audit's coverage check
    record(site, msg, Event.EVALUATION_SENT, **logged)
    return answer


def evaluation_plan(site: Site, cfg: RunConfig) -> EvaluationPlan | None:
    """The run's evaluation plan (None without DP): σ for every evaluation the run may ask for."""
    p, t = cfg.privacy, cfg.train
    if not p.enabled:
        return None
    first = 0 if p.feature_stats else 1  # round 0 (the statistics release) is evaluated too
    releases = sum(t.evaluates(r) for r in range(first, t.rounds + 1))
    if p.target_delta >= 1.0 / max(test_units(site, cfg).count, 1):
        raise Declined(
            f"privacy.target_delta {p.target_delta:g} is not below 1/n for this site's {len(site.test_y)} test "
            "records; its evaluation cannot be released (lower target_delta)"
        )
    return plan_evaluation(
        releases=max(releases, 1),
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
    site: Site, cfg: RunConfig, head: torch.nn.Module, *, run_id: str, server_round: int
) -> tuple[dict[str, np.ndarray], DPRecord | None, float]:
    """The released statistics, their DP record and the evaluation ε so far, charged before they are returned.

    A function of (model, test split, plan) alone, so that a training reply could carry it too.
    """
    plan = evaluation_plan(site, cfg)
    units = test_units(site, cfg)
    stats = evaluation_statistics(head, site.test_x, site.test_y, len(site.data.test.classes), units)
    ledger = PrivacyLedger(site.ledger_path, run_key=run_id)
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
        return released, None, epsilon
    dp = DPRecord(plan.noise_multiplier, 1.0, 1, 1.0, plan.target_delta, plan.accountant)
    return released, dp, epsilon
