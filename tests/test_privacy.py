"""Privacy: noise calibrated to the whole run, a ledger that composes every round, and site policies."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from fedtransfer.client.site import Declined, enforce_policy
from fedtransfer.common.config.run import ConfigError, PrivacyConfig, RunConfig, SitePolicy, TrainConfig
from fedtransfer.common.model.head import make_head
from fedtransfer.common.privacy.calibration import epsilon_of, plan_dp, plan_fedsgd
from fedtransfer.common.privacy.dp_sgd import LocalTraining, train_head
from fedtransfer.common.privacy.events import gaussian_steps
from fedtransfer.common.privacy.ledger import BudgetExceeded, PrivacyLedger
from fedtransfer.common.privacy.plans import GaussianPlan

N, DIM, CLASSES, BATCH = 200, 16, 3, 50
EPSILON, DELTA, ROUNDS, LOCAL_EPOCHS = 3.0, 1e-3, 3, 1


@functools.cache
def _plan(accountant: str) -> GaussianPlan:
    """Calibrating noise runs the accountant many times (seconds for prv): once per accountant here."""
    return plan_dp(
        num_samples=N,
        batch_size=BATCH,
        local_epochs=LOCAL_EPOCHS,
        rounds=ROUNDS,
        target_epsilon=EPSILON,
        target_delta=DELTA,
        max_grad_norm=1.0,
        accountant=accountant,
    )


def _total_epsilon(plan: GaussianPlan, steps: int) -> float:
    return epsilon_of(
        [gaussian_steps(plan.noise_multiplier, plan.sample_rate, steps)], plan.target_delta, plan.accountant
    )


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_noise_is_calibrated_for_the_whole_run(accountant: str) -> None:
    plan = _plan(accountant)
    assert plan.sample_rate == BATCH / N
    assert plan.steps_per_round == LOCAL_EPOCHS * N // BATCH
    assert plan.total_steps == ROUNDS * plan.steps_per_round
    whole_run = _total_epsilon(plan, plan.total_steps)
    assert 0.98 * EPSILON <= whole_run <= EPSILON + 1e-9
    one_round = _total_epsilon(plan, plan.steps_per_round)  # what a plan for one round only would have used up
    assert one_round < 0.7 * EPSILON
    assert whole_run > 1.5 * one_round


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_equals_opacus_on_the_raw_history(accountant: str) -> None:
    """Merging repeated rounds and caching change only float rounding (PRV composes n steps of one (σ, q) as one
    self-composition instead of n: 1e-11 apart; unmerged, a 100-round fedsgd history takes PRV ~50 s)."""
    from opacus.accountants import create_accountant

    raw = [(3.49, 0.05, 200)] * 4 + [(2.0, 0.1, 50)] + [(3.49, 0.05, 200)] * 2
    history = [gaussian_steps(*h) for h in raw]
    acc = create_accountant(mechanism=accountant)
    acc.history = list(raw)
    rel = 1e-12 if accountant == "rdp" else 1e-9
    assert epsilon_of(history, 1e-5, accountant) == pytest.approx(acc.get_epsilon(delta=1e-5), rel=rel)
    assert epsilon_of(history[:3], 1e-5, accountant) < epsilon_of(history, 1e-5, accountant)


def test_delta_not_below_one_over_n_is_refused() -> None:
    with pytest.raises(ConfigError, match="target_delta"):
        plan_dp(
            num_samples=N,
            batch_size=BATCH,
            local_epochs=1,
            rounds=1,
            target_epsilon=EPSILON,
            target_delta=1.0 / N,
            max_grad_norm=1.0,
            accountant="rdp",
        )


def _train_rounds(ledger_path: Path, plan: GaussianPlan, rounds: int, run_key: str = "run-1") -> list[float]:
    """What client_app._train does each round: check the budget, train from the ledger, record."""
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(N, DIM, generator=gen)
    labels = torch.randint(0, CLASSES, (N,), generator=gen)
    opts = LocalTraining(epochs=LOCAL_EPOCHS, batch_size=BATCH, learning_rate=0.5)
    reported = []
    for server_round in range(1, rounds + 1):
        ledger = PrivacyLedger(ledger_path, run_key)
        ledger.check_round(plan)
        head = make_head(DIM, CLASSES)
        outcome = train_head(head, features, labels, opts, plan, ledger.history, seed=server_round)
        assert outcome.steps == plan.steps_per_round
        reported.append(ledger.record_round(server_round, plan, outcome.history))
    return reported


@pytest.fixture(scope="module")
def trained_ledger(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GaussianPlan, list[float]]:
    path = tmp_path_factory.mktemp("site") / "privacy-ledger.json"
    plan = _plan("rdp")
    return path, plan, _train_rounds(path, plan, ROUNDS)


def test_reported_epsilon_composes_every_round(trained_ledger: tuple[Path, GaussianPlan, list[float]]) -> None:
    path, plan, reported = trained_ledger
    ledger = PrivacyLedger(path, "run-1")
    assert ledger.history == [gaussian_steps(plan.noise_multiplier, plan.sample_rate, ROUNDS * plan.steps_per_round)]
    whole = _total_epsilon(plan, ROUNDS * plan.steps_per_round)
    assert reported[-1] == pytest.approx(whole, abs=1e-9)
    assert reported[0] == pytest.approx(_total_epsilon(plan, plan.steps_per_round), abs=1e-9)
    assert reported[0] < reported[1] < reported[2] <= EPSILON + 1e-9
    assert [r["round"] for r in ledger.entry["rounds"]] == [1, 2, 3]


def test_ledger_survives_reopening(trained_ledger: tuple[Path, GaussianPlan, list[float]]) -> None:
    path, plan, reported = trained_ledger
    reopened = PrivacyLedger(path, "run-1")
    assert reopened.spent(plan.target_delta, plan.accountant) == pytest.approx(reported[-1], abs=1e-12)
    assert PrivacyLedger(path, "another-run").spent(plan.target_delta, plan.accountant) == 0.0


def test_budget_is_refused_after_the_planned_rounds(trained_ledger: tuple[Path, GaussianPlan, list[float]]) -> None:
    path, plan, _ = trained_ledger
    with pytest.raises(BudgetExceeded, match="budget"):
        PrivacyLedger(path, "run-1").check_round(plan)


def test_other_runs_are_composed(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    plan = _dp_plan(target_delta=DELTA)
    a, b = [gaussian_steps(1.0, 0.25, 10)], [gaussian_steps(2.0, 0.1, 30)]
    PrivacyLedger(path, "a").record_round(1, plan, a)
    PrivacyLedger(path, "b").record_round(1, plan, b)
    both = epsilon_of(a + b, DELTA, "rdp")
    assert PrivacyLedger(path, "c").spent_in_other_runs(DELTA, "rdp") == pytest.approx(both, abs=1e-12)
    only_b = PrivacyLedger(path, "a").spent_in_other_runs(DELTA, "rdp")
    assert 0 < only_b < both


def test_prv_accountant_trains_and_composes(tmp_path: Path) -> None:
    plan = _plan("prv")
    (reported,) = _train_rounds(tmp_path / "ledger.json", plan, 1)
    assert reported == pytest.approx(_total_epsilon(plan, plan.steps_per_round), abs=1e-9)
    assert 0 < reported < EPSILON
    assert PrivacyLedger(tmp_path / "ledger.json", "run-1").history == [
        gaussian_steps(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
    ]


def test_empty_poisson_batches_are_noised_and_accounted() -> None:
    """batch_size 1 over 20 samples: q = 0.05, so about a third of the Poisson batches are empty."""
    gen = torch.Generator().manual_seed(1)
    features, labels = torch.randn(20, DIM, generator=gen), torch.randint(0, CLASSES, (20,), generator=gen)
    plan = _dp_plan(sample_rate=0.05, steps_per_round=20, target_delta=1e-3)
    head = make_head(DIM, CLASSES)
    before = [p.detach().clone() for p in head.parameters()]
    outcome = train_head(head, features, labels, LocalTraining(1, 1, 0.1), plan, [], seed=1)
    assert outcome.steps == 20
    assert outcome.history == [gaussian_steps(1.0, 0.05, 20)]
    assert all(torch.isfinite(p).all() for p in head.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(before, head.parameters(), strict=True))


def test_corrupt_ledger_is_an_error_not_a_fresh_budget(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    path.write_text("{ torn", encoding="utf-8")
    with pytest.raises(RuntimeError, match="unreadable"):
        PrivacyLedger(path, "run-1")


def _dp_plan(**changes: float) -> GaussianPlan:
    values = {
        "noise_multiplier": 1.0,
        "sample_rate": 0.1,
        "steps_per_round": 10,
        "rounds": 5,
        "max_grad_norm": 1.0,
        "target_epsilon": 3.0,
        "target_delta": 1e-5,
        "accountant": "rdp",
    } | changes
    return GaussianPlan(**values)  # type: ignore[arg-type]


CFG = RunConfig(train=TrainConfig(rounds=5), privacy=PrivacyConfig(target_epsilon=3.0))


@pytest.mark.parametrize(
    ("policy", "plan", "spent", "named"),
    [
        (SitePolicy(max_epsilon=2.0), _dp_plan(), 0.0, "policy.max_epsilon"),
        (SitePolicy(max_epsilon=4.0), _dp_plan(), 1.5, "policy.max_epsilon"),
        (SitePolicy(max_delta=1e-6), _dp_plan(), 0.0, "policy.max_delta"),
        (SitePolicy(max_rounds=4), _dp_plan(), 0.0, "policy.max_rounds"),
        (SitePolicy(min_noise_multiplier=1.5), _dp_plan(), 0.0, "policy.min_noise_multiplier"),
        (SitePolicy(max_clip_norm=0.5), _dp_plan(), 0.0, "policy.max_clip_norm"),
        (SitePolicy(require_dp=True), None, 0.0, "requires differential privacy"),
    ],
)
def test_site_policy_refuses_each_limit(
    policy: SitePolicy, plan: GaussianPlan | None, spent: float, named: str
) -> None:
    with pytest.raises(Declined, match=named):
        enforce_policy(policy, CFG, plan, spent)


def test_site_policy_accepts_a_plan_within_limits() -> None:
    enforce_policy(SitePolicy(max_epsilon=4.0, max_rounds=5, min_noise_multiplier=1.0), CFG, _dp_plan(), 1.0)
    enforce_policy(SitePolicy(require_dp=False), CFG, None, 0.0)
    enforce_policy(None, CFG, None, 0.0)  # simulation: the run config is the site's own


def test_spent_before_counts_only_runs_the_ledger_held_before_this_one(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    plan = _dp_plan(target_delta=DELTA)
    a, b, c = [gaussian_steps(1.0, 0.25, 10)], [gaussian_steps(2.0, 0.1, 30)], [gaussian_steps(1.5, 0.2, 20)]
    for key, history in (("a", a), ("b", b), ("c", c)):
        PrivacyLedger(path, key).record_round(1, plan, history)
    PrivacyLedger(path, "a").record_round(2, plan, a + a)  # a later round keeps a's place in the order
    assert PrivacyLedger(path, "a").spent_before(DELTA, "rdp") == 0.0
    assert PrivacyLedger(path, "c").spent_before(DELTA, "rdp") == pytest.approx(epsilon_of(a + a + b, DELTA, "rdp"))
    assert PrivacyLedger(path, "never-trained").spent_before(DELTA, "rdp") is None


@pytest.mark.parametrize(
    ("stats_share", "what"),
    [
        (None, r"30 step\(s\) at sample rate 1; raise it, or lower train\.rounds"),
        (0.2, "the feature statistics' one release; raise it"),
    ],
)
def test_an_epsilon_no_noise_can_meet_is_one_line_naming_the_key(stats_share: float | None, what: str) -> None:
    # Opacus' own search gives up ("The privacy budget is too low"): that is the user's ε, not a bug
    with pytest.raises(
        ConfigError, match=rf"^privacy\.target_epsilon: 0\.001 is too small \(no noise meets it\) for {what}$"
    ):
        plan_fedsgd(
            num_units=1000,
            sample_rate=1.0,
            rounds=30,
            target_epsilon=0.001,
            target_delta=1e-5,
            max_grad_norm=1.0,
            accountant="rdp",
            stats_share=stats_share,
        )
