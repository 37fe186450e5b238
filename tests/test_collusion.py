"""privacy.colluding_sites: the Skellam shares hold the aggregate ε when t sites reveal theirs to the coordinator;
refused at t ≥ K_min; recorded with every training and in the ledger; a site's policy can require a minimum t."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fedtransfer.client.site import Declined, enforce_policy
from fedtransfer.common.config.run import ConfigError, SitePolicy, config_from_dict
from fedtransfer.common.privacy import skellam
from fedtransfer.common.privacy.calibration import plan_distributed
from fedtransfer.common.privacy.events import from_json, skellam_steps, to_json
from fedtransfer.common.privacy.mechanisms import event_of, mechanism_for
from fedtransfer.common.privacy.plans import SkellamPlan
from fedtransfer.common.wire.protocol import DPRecord
from fedtransfer.server.audit.empirical_replay import _coordinator_view, honest_others
from fedtransfer.server.audit.trust import _share_problem

TARGET, DELTA, ROUNDS = 3.0, 1e-5, 30
RUN = {
    "train": {"protocol": "fedsgd", "rounds": 3, "min_sites": 4, "fraction_evaluate": 0.0},
    "data": {"num_sites": 4},
    "secure_aggregation": True,
    "secagg": {"quantization_range": 2**27, "max_weight": 2048, "reconstruction_threshold": 0.67},
    "privacy": {"trust": "distributed", "target_delta": 1e-3, "accountant": "rdp", "feature_stats": False},
}


def _plan(colluding: int) -> SkellamPlan:
    """configs/distributed.yaml's rounds, rate and K_min = 3, a small head: μ for the aggregate at ε = 3."""
    return plan_distributed(
        num_units=1000,
        sample_rate=1.0,
        rounds=ROUNDS,
        target_epsilon=TARGET,
        target_delta=DELTA,
        max_grad_norm=1.0,
        dim=1290,
        min_survivors=3,
        gamma=2.0**-14,
        stats_gamma=2.0**-14,
        colluding_sites=colluding,
    )


def _after_subtracting(plan: SkellamPlan, revealed: int) -> float:
    """ε against a coordinator that subtracts `revealed` sites' own shares from the sum of K_min sites."""
    left = (plan.min_survivors - revealed) * plan.noise_share
    rounds = skellam_steps(
        left, plan.sample_rate, plan.rounds, l1=plan.l1_sensitivity, l2=plan.l2_sensitivity, min_survivors=1
    )
    return skellam.epsilon((rounds,), plan.target_delta)


def test_one_colluding_site_keeps_the_aggregate_epsilon_within_target_when_planned_for() -> None:
    planned, unplanned = _plan(1), _plan(0)
    assert planned.noise_variance == unplanned.noise_variance  # μ, the aggregate's accounting, is unchanged
    assert planned.noise_share == pytest.approx(unplanned.noise_share * 3 / 2)  # each share: K_min/(K_min − t)
    assert _after_subtracting(planned, 1) <= TARGET + 1e-9
    assert _after_subtracting(unplanned, 1) > TARGET + 0.3  # t = 0 promises nothing against a revealed share
    assert _after_subtracting(planned, 2) > TARGET + 0.3  # nor does t = 1 against two
    assert planned.round_event.mechanism.share == planned.noise_share


def test_colluding_sites_at_or_above_k_min_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^privacy\.colluding_sites: must be below K_min = 3[^\n]*$"):
        config_from_dict(RUN | {"privacy": RUN["privacy"] | {"colluding_sites": 3}})
    with pytest.raises(ConfigError, match=r"^privacy\.colluding_sites: must be >= 0"):
        config_from_dict(RUN | {"privacy": RUN["privacy"] | {"colluding_sites": -1}})


def test_the_site_records_t_with_its_share_and_the_audit_recomputes_under_it() -> None:
    cfg = config_from_dict(RUN | {"privacy": RUN["privacy"] | {"colluding_sites": 1}})
    mech = mechanism_for(cfg)
    plan = mech.plan(
        num_samples=300, units=300, dim=1290, feature_dim=128, num_classes=10, remember=lambda f, **k: f(**k)
    )
    assert isinstance(plan, SkellamPlan) and plan.colluding_sites == 1 and plan.honest_survivors == 2
    record = mech.describe(plan, plan.round_event, release=False)
    assert (record.colluding_sites, record.noise_share) == (1, plan.noise_variance / 2)
    logged = record.as_dict()
    assert DPRecord.from_mapping(logged) == record
    assert _share_problem(logged, 3, cfg, release=False) is None
    assert "colluding" in _share_problem({**logged, "colluding_sites": 0}, 3, cfg, release=False)
    assert event_of(record) == plan.round_event  # the audit's ε under t is the site's
    individual = skellam.epsilon((plan.round_event,) * 3, 1e-3, individual=True)
    at_zero = skellam_steps(
        plan.noise_variance, 1.0, 1, l1=plan.l1_sensitivity, l2=plan.l2_sensitivity, min_survivors=3
    )
    assert individual < skellam.epsilon((at_zero,) * 3, 1e-3, individual=True)  # a bigger share: a smaller own-ε


def test_ledger_lists_keep_their_old_shape_at_t_zero_and_carry_t_otherwise() -> None:
    at_zero = skellam_steps(4.0, 0.5, 2, l1=3.0, l2=2.0, min_survivors=3)
    at_one = skellam_steps(4.0, 0.5, 2, l1=3.0, l2=2.0, min_survivors=3, colluding_sites=1)
    assert to_json(at_zero) == ["skellam", 4.0, 0.5, 2, 3.0, 2.0, 3]
    assert to_json(at_one) == [*to_json(at_zero), 1]
    assert [from_json(to_json(e)) for e in (at_zero, at_one)] == [at_zero, at_one]
    old = DPRecord(1.0, 0.5, 2, 1.0, 1e-5, "rdp", "skellam", 4.0, 4 / 3, 3).as_dict()
    assert "colluding_sites" not in old  # t = 0: the record's form before the key existed
    assert DPRecord.from_mapping(old).colluding_sites == 0
    planned = DPRecord(1.0, 0.5, 2, 1.0, 1e-5, "rdp", "skellam", 4.0, 2.0, 3, colluding_sites=1)
    assert DPRecord.from_mapping(planned.as_dict()) == planned


def test_a_site_policy_can_require_a_minimum_of_colluding_sites() -> None:
    cfg = config_from_dict(RUN)
    plan = mechanism_for(cfg).plan(
        num_samples=300, units=300, dim=1290, feature_dim=128, num_classes=10, remember=lambda f, **k: f(**k)
    )
    policy = SitePolicy(max_delta=1e-2, allow_distributed_trust=True, min_colluding_sites=1)
    with pytest.raises(Declined, match=r"^site policy \(a\.yaml\): policy\.min_colluding_sites: [^\n]*$"):
        enforce_policy(policy, cfg, plan, 0.0, distributed=True, policy_file=Path("sites/a.yaml"))
    planned = config_from_dict(RUN | {"privacy": RUN["privacy"] | {"colluding_sites": 1}})
    enforce_policy(policy, planned, plan, 0.0, distributed=True, policy_file=Path("sites/a.yaml"))
    with pytest.raises(ConfigError, match=r"^policy\.min_colluding_sites: must be >= 0"):
        SitePolicy(min_colluding_sites=-1)


def test_the_canary_replay_adds_only_the_honest_others_shares_under_t() -> None:
    """The coordinator's view in the canary test: the site's share plus K_min − 1 − t others' carry exactly μ."""
    plan = _plan(1)
    assert honest_others(plan) == 1
    zeros = {"w": torch.zeros(200_000, dtype=torch.float64)}
    seen = _coordinator_view(zeros, plan, "aggregate", torch.Generator().manual_seed(0))["w"] / plan.quantum
    assert float(seen.var()) == pytest.approx(plan.noise_share, rel=0.02)  # one other honest share
    assert plan.noise_share * (1 + honest_others(plan)) == pytest.approx(plan.noise_variance)
    assert _coordinator_view(zeros, plan, "own", torch.Generator().manual_seed(0)) is zeros  # bypassed: alone


def test_the_audit_fails_a_run_that_announces_another_t_than_its_config(tmp_path: Path) -> None:
    from fedtransfer.server.audit.findings import Entry, Evidence, Findings
    from fedtransfer.server.audit.trust import audit_announced_trust

    cfg = config_from_dict(RUN | {"privacy": RUN["privacy"] | {"colluding_sites": 1}})
    log = tmp_path / "audit.jsonl"

    def failures(started: dict) -> list[str]:
        record = {"event": "run-started", "trust": "distributed", "min_survivors": 3, **started}
        found = Findings()
        audit_announced_trust(Evidence(tmp_path, log, [], True, "r", cfg, server=[Entry(log, 1, record)]), [], found)
        return [f.reason for f in found.failures]

    assert failures({"colluding_sites": 1}) == []
    assert failures({}) == ["run-started announces privacy.colluding_sites 0; the run's config gives 1"]
