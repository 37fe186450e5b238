"""The canary audit replays the mechanism that ran: under distributed trust the integer rounding and Skellam
shares (the aggregate and the site's own message, each against its own claim), per-person units, and it still
catches a run whose noise is off."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fedtransfer.common.config.run import config_from_dict
from fedtransfer.common.privacy import skellam
from fedtransfer.common.privacy.calibration import epsilon_of
from fedtransfer.common.privacy.mechanisms import fedsgd_distributed, mechanism_for
from fedtransfer.common.privacy.plans import SkellamPlan
from fedtransfer.server.audit import empirical_replay
from fedtransfer.server.audit.empirical import CanarySettings, audit_training
from fedtransfer.server.audit.empirical_replay import canary_units, replay_plan

DISTRIBUTED = {
    "train": {"protocol": "fedsgd", "rounds": 8, "sample_rate": 1.0, "learning_rate": 2.0, "min_sites": 4},
    "data": {"num_sites": 4},
    "secure_aggregation": True,
    "secagg": {"quantization_range": 2**27, "max_weight": 2048, "reconstruction_threshold": 0.67},
    "privacy": {
        "trust": "distributed",
        "accountant": "rdp",
        "target_epsilon": 1.0,
        "target_delta": 1e-4,
        "feature_stats": True,
    },
}
SETTINGS = CanarySettings(num_canaries=400)


def _features(n: int = 200, dim: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    means, labels = rng.random((10, dim)), rng.integers(0, 10, n)
    x = np.maximum(means[labels] + 0.5 * rng.standard_normal((n, dim)), 0)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(labels)


def test_the_replay_plans_with_the_runs_own_mechanism() -> None:
    """The plan the audit attacks is the one the run's mechanism makes: Skellam, K_min = 3, γ of the run."""
    cfg = config_from_dict(DISTRIBUTED)
    units = canary_units(300, 300, cfg)
    plan = replay_plan(cfg, units, feature_dim=128, num_classes=10)
    assert isinstance(plan, SkellamPlan) and plan.min_survivors == 3 and plan.has_release
    assert plan.quantum == cfg.secagg.quantum(cfg.privacy.max_grad_norm)
    assert plan == mechanism_for(cfg).plan(
        num_samples=300, units=300, dim=10 * 129, feature_dim=128, num_classes=10, remember=lambda f, **k: f(**k)
    )


def test_distributed_audit_reports_both_claims_and_passes_the_honest_site() -> None:
    x, y = _features()
    cfg = config_from_dict(DISTRIBUTED)
    aggregate = audit_training(x, y, 10, cfg, SETTINGS)
    own = audit_training(x, y, 10, cfg, SETTINGS, message="own")
    assert aggregate.claimed_epsilon == pytest.approx(1.0, abs=0.02)  # the run's target, the release counted
    assert own.claimed_epsilon > 1.5 * aggregate.claimed_epsilon  # one share of three: far less noise
    assert "Skellam" in aggregate.mechanism and "aggregate" in aggregate.mechanism
    assert "own message" in own.mechanism
    assert not aggregate.exceeds_claim and not own.exceeds_claim
    assert aggregate.eps_ceiling > 3.0  # the test could have proved far more than the claim


def test_distributed_run_with_its_noise_off_fails_the_audit(monkeypatch) -> None:
    """Every site's share off (the site's, the statistics' and the other survivors'): rounding alone is no DP."""

    def silent(shape, variance, generator, device):
        return torch.zeros(tuple(shape), dtype=torch.int64, device=device)

    for module in (skellam, fedsgd_distributed, empirical_replay):
        monkeypatch.setattr(module, "sample", silent)
    x, y = _features()
    broken = audit_training(x, y, 10, config_from_dict(DISTRIBUTED), SETTINGS)
    assert broken.claimed_epsilon == pytest.approx(1.0, abs=0.02)  # it still claims the DP it lacks
    assert broken.exceeds_claim, broken.eps_lower_bound


def test_user_units_are_replayed_per_person() -> None:
    """privacy.unit: user: the plan counts persons (synthetic users of 4 records, each canary its own), and the
    honest run passes against the accountant's ε of that plan."""
    raw = dict(DISTRIBUTED)
    raw["privacy"] = {**DISTRIBUTED["privacy"], "unit": "user", "synthetic_users": 4, "target_delta": 1e-3}
    cfg = config_from_dict(raw)
    x, y = _features()
    units = canary_units(200, 260, cfg)
    assert units.count == 50 + 60
    plan = replay_plan(cfg, units, feature_dim=128, num_classes=10)
    assert plan.unit == "user"
    result = audit_training(x, y, 10, cfg, CanarySettings(num_canaries=200))
    assert not result.exceeds_claim
    assert result.claimed_epsilon == pytest.approx(1.0, abs=0.02)
    assert epsilon_of([plan.stats_event, *[plan.round_event] * 8], 1e-3, "rdp") == pytest.approx(1.0, abs=0.02)
