"""The privacy mechanisms: one per protocol × trust, typed accountant events, and today's numbers unchanged.

tests/fixtures/privacy_plans_622fd32.json was written by the planner at 622fd32, before plans and
histories were typed, from each shipped config's real site sizes: every noise multiplier, variance and
ε below must come out identical (==, not approx), and ledgers written then must keep loading.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fedtransfer.client.prepared import PreparedState, remembered_plan
from fedtransfer.common.config.parse import ConfigError
from fedtransfer.common.config.run import PrivacyConfig, RunConfig, TrainConfig, config_from_dict, load_config
from fedtransfer.common.privacy.calibration import epsilon_of, plan_distributed, plan_dp, plan_fedsgd
from fedtransfer.common.privacy.events import from_json, gaussian_steps, skellam_steps, to_json
from fedtransfer.common.privacy.ledger import PrivacyLedger
from fedtransfer.common.privacy.mechanisms import event_of, mechanism_for, mechanisms
from fedtransfer.common.privacy.plans import GaussianPlan, SkellamPlan, plan_from_record
from fedtransfer.common.wire.protocol import DPRecord

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "privacy_plans_622fd32.json").read_text())


def same_as(epsilon: float) -> Any:
    """An ε equal to the fixture's to 1e-8, relative. Plans (σ, q, steps) are compared exactly; an ε is Opacus'
    numerical integration (PRV: scipy's quad), whose last digits move between numpy/scipy releases within
    pyproject's ranges (2.9931348416246824 against 2.993134841636536 on a fresh install of 2026-12-08). A
    change of mechanism or history moves ε by far more than that."""
    return pytest.approx(epsilon, rel=1e-8, abs=0.0)


PLANNERS = {"fedavg": plan_dp, "fedsgd": plan_fedsgd, "distributed": plan_distributed}
SITES = [(config, site) for config, sites in sorted(FIXTURE.items()) for site in sites]


def _plan_of(site: dict[str, Any]) -> GaussianPlan | SkellamPlan:
    return PLANNERS[site["kind"]](**site["inputs"])


def _as_old_fields(plan: GaussianPlan | SkellamPlan) -> dict[str, Any]:
    """The new plan in the one-class DPPlan's fields of 622fd32 (zeros where a field did not apply)."""
    if isinstance(plan, GaussianPlan):
        zeros = ("noise_variance", "min_survivors", "quantum", "l1_sensitivity", "l2_sensitivity")
        stats_zeros = ("stats_variance", "stats_l1", "stats_l2", "stats_quantum")
        return plan.as_record() | dict.fromkeys(zeros + stats_zeros, 0) | {"mechanism": None}
    out = plan.as_record() | {
        "noise_multiplier": plan.noise_multiplier,
        "stats_noise_multiplier": plan.stats_noise_multiplier,
        "accountant": plan.accountant,
        "steps_per_round": plan.steps_per_round,
        "mechanism": None,
    }
    assert out.pop("colluding_sites") == 0  # shipped configs plan for t = 0: 622fd32's shares, to the digit
    return out | {k: out[k] or 0.0 for k in ("stats_variance", "stats_l1", "stats_l2", "stats_quantum")}


@pytest.mark.parametrize(("config", "site"), SITES, ids=[f"{c}-{s['site']}" for c, s in SITES])
def test_every_shipped_configs_plan_and_epsilon_are_unchanged(config: str, site: dict[str, Any]) -> None:
    plan = _plan_of(site)
    old = site["plan"] | {"mechanism": None}
    assert _as_old_fields(plan) == old
    history = ([plan.stats_event] if plan.has_release else []) + [plan.round_event] * plan.rounds
    assert epsilon_of(history, plan.target_delta, plan.accountant) == same_as(site["epsilon"])
    if site["epsilon_stats"] is not None:
        assert epsilon_of([plan.stats_event], plan.target_delta, plan.accountant) == same_as(site["epsilon_stats"])
    if plan.distributed:
        assert epsilon_of(history, plan.target_delta, plan.accountant, True) == same_as(site["epsilon_individual"])


def test_the_demo_still_spends_what_the_readme_says() -> None:
    """README.md, docs/demo-run.json: demo per-site ε 2.993 (δ = 1e-5, PRV, round 0's statistics release included)."""
    spent = {round(s["epsilon"], 3) for s in FIXTURE["demo.yaml"]}
    assert spent == {2.993}
    assert max(epsilon_of(_history(s), 1e-5, "prv") for s in FIXTURE["demo.yaml"]) == same_as(
        max(s["epsilon"] for s in FIXTURE["demo.yaml"])
    )


def _history(site: dict[str, Any]) -> list:
    plan = _plan_of(site)
    return ([plan.stats_event] if plan.has_release else []) + [plan.round_event] * plan.rounds


@pytest.mark.parametrize("config", ["demo.yaml", "distributed.yaml", "demo-fedavg.yaml"])
def test_a_ledger_written_before_typed_events_loads_and_grows_in_its_format(config: str, tmp_path: Path) -> None:
    site = FIXTURE[config][0]
    path = tmp_path / "privacy-ledger.json"
    path.write_text(json.dumps(site["ledger_two_rounds"], indent=1))
    ledger = PrivacyLedger(path, run_key="run-a")
    plan = _plan_of(site)
    written = site["ledger_two_rounds"]["runs"]["run-a"]
    assert ledger.spent(plan.target_delta, plan.accountant) == same_as(written["rounds"][-1]["epsilon"])
    assert [to_json(e) for e in ledger.history] == written["history"]
    grown = [*ledger.history, plan.round_event]
    ledger.record_round(3, plan, grown)
    again = json.loads(path.read_text())["runs"]["run-a"]
    assert again["history"] == [*written["history"], to_json(plan.round_event)]
    assert again["rounds"][:-1] == written["rounds"]


def test_a_ledger_entry_of_neither_shape_is_an_error_not_a_fresh_budget(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    path.write_text(json.dumps({"runs": {"r": {"history": [["laplace", 1.0]], "rounds": []}}}))
    with pytest.raises(RuntimeError, match="restore it from backup"):
        _ = PrivacyLedger(path, "r").history


def test_events_keep_the_ledgers_list_form_both_ways() -> None:
    gauss, skel = gaussian_steps(1.5, 0.25, 4), skellam_steps(9.0, 1.0, 1, l1=3.0, l2=2.0, min_survivors=3)
    assert to_json(gauss) == [1.5, 0.25, 4]
    assert to_json(skel) == ["skellam", 9.0, 1.0, 1, 3.0, 2.0, 3]
    assert from_json(to_json(gauss)) == gauss and from_json(to_json(skel)) == skel
    with pytest.raises(ValueError, match="not an accountant history entry"):
        from_json(["skellam", 1.0])


def test_a_dp_record_reads_back_as_the_event_the_mechanism_spent() -> None:
    cfg = config_from_dict({"privacy": {"feature_stats": False}})
    plan = plan_fedsgd(
        num_units=500,
        sample_rate=1.0,
        rounds=5,
        target_epsilon=3.0,
        target_delta=1e-5,
        max_grad_norm=1.0,
        accountant="rdp",
    )
    mechanism = mechanism_for(cfg)
    assert event_of(mechanism.describe(plan, plan.round_event, release=False)) == plan.round_event


def test_one_mechanism_per_protocol_and_trust_is_chosen_from_the_config() -> None:
    assert set(mechanisms()) == {("fedavg", "local"), ("fedsgd", "local"), ("fedsgd", "distributed")}
    for (protocol, trust), kind in mechanisms().items():
        assert (kind.protocol, kind.trust) == (protocol, trust)
    fedavg = mechanism_for(RunConfig(train=TrainConfig(protocol="fedavg"), privacy=PrivacyConfig(feature_stats=False)))
    assert (fedavg.protocol, fedavg.sends_gradient_sums, fedavg.distributed) == ("fedavg", False, False)
    fedsgd = mechanism_for(RunConfig())
    assert (fedsgd.protocol, fedsgd.sends_gradient_sums, fedsgd.distributed) == ("fedsgd", True, False)


def test_a_pair_no_mechanism_serves_is_one_config_error() -> None:
    """fedavg under distributed trust (the config refuses it first; a hand-built config meets this)."""
    bogus = SimpleNamespace(train=SimpleNamespace(protocol="fedavg"), privacy=SimpleNamespace(trust="distributed"))
    with pytest.raises(ConfigError, match="no privacy mechanism serves"):
        mechanism_for(bogus)  # type: ignore[arg-type]


def test_only_the_distributed_mechanism_declines_a_plain_message() -> None:
    distributed = mechanisms()[("fedsgd", "distributed")](RunConfig())
    with pytest.raises(ValueError, match="only masked under secure aggregation"):
        distributed.check_message(secure=False)
    distributed.check_message(secure=True)
    mechanisms()[("fedsgd", "local")](RunConfig()).check_message(secure=False)


def test_a_plan_cached_by_older_code_is_recomputed_not_misread(tmp_path: Path) -> None:
    """A one-class DPPlan record (no `mechanism`, zeroed Skellam fields) is never read as a Gaussian plan."""
    site = FIXTURE["demo.yaml"][0]
    with pytest.raises(TypeError):
        plan_from_record(site["plan"])
    plan = _plan_of(site)
    assert plan_from_record(plan.as_record()) == plan
    state = PreparedState(tmp_path / "prepared", secret=7)
    assert remembered_plan(state, plan_fedsgd, site["inputs"]) == plan
    for record in state.folder.glob("plan-*.json"):  # the record rewritten in the old one-class shape
        data = json.loads(record.read_text())
        data["value"] = site["plan"]
        record.write_text(json.dumps(data))
    assert remembered_plan(state, plan_fedsgd, site["inputs"]) == plan


RECORDS = json.loads((Path(__file__).parent / "fixtures" / "dp_records_622fd32.json").read_text())
CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.mark.parametrize("config", sorted(RECORDS))
def test_dp_records_logged_and_sent_before_keep_their_form_and_meaning(config: str) -> None:
    """The audit log's `dp`, a cached reply's DP record: what the shipped config's mechanism describes now is what
    622fd32 wrote, and what 622fd32 wrote reads back as the event its ledger held (the audit recomputes ε from it)."""
    plan, mechanism = _plan_of(FIXTURE[config][0]), mechanism_for(load_config(CONFIGS / config))
    for written in RECORDS[config]:
        event = plan.stats_event if written["release"] else plan.round_event
        assert mechanism.describe(plan, event, release=written["release"]).as_dict() == written["dp"]
        assert to_json(event_of(DPRecord.from_mapping(written["dp"]))) == written["ledger_entry"]


COUNTED = json.loads((Path(__file__).parent / "fixtures" / "privacy_plans_record_counts.json").read_text())
COUNTED_SITES = [(config, site) for config, sites in sorted(COUNTED.items()) for site in sites]


@pytest.mark.parametrize(("config", "site"), COUNTED_SITES, ids=[f"{c}-{s['site']}" for c, s in COUNTED_SITES])
def test_shipped_fedavg_configs_plan_from_their_released_count(config: str, site: dict[str, Any]) -> None:
    """Issue 23 changed these plans on purpose (tests/fixtures/privacy_plans_record_counts.json, written by the
    planner then; 622fd32's figures beside them): round 0 now releases the record counts at privacy.count_share
    and the Poisson rate comes from the released count (here the site's size, as if released without noise).
    Every figure must come out identical; the configs with the statistics (demo.yaml, distributed.yaml) keep
    622fd32's (test_every_shipped_configs_plan_and_epsilon_are_unchanged)."""
    cfg = load_config(CONFIGS / config)
    n, seen = site["inputs"]["num_samples"], {}

    def remember(planner: Any, **arguments: Any) -> GaussianPlan | SkellamPlan:
        seen.update(arguments)
        return planner(**arguments)

    plan = mechanism_for(cfg).plan(
        num_samples=n, units=n, dim=0, feature_dim=0, num_classes=0, remember=remember, released=float(n)
    )
    assert plan is not None and seen == site["inputs"] and plan.as_record() == site["plan"]
    assert seen["stats_share"] == cfg.privacy.count_share and seen["released_count"] == n
    history = [plan.stats_event] + [plan.round_event] * plan.rounds
    assert epsilon_of(history, plan.target_delta, plan.accountant) == same_as(site["epsilon"])
    assert site["epsilon"] <= cfg.privacy.target_epsilon
    assert epsilon_of([plan.stats_event], plan.target_delta, plan.accountant) == same_as(site["epsilon_release"])


def test_the_sample_rate_follows_the_released_count_not_the_exact_one() -> None:
    """Issue 23, item 1: fedavg's DP record carries the plan's rate; from an exact n it gave n away."""
    cfg = load_config(CONFIGS / "demo-fedavg.yaml")

    def plan(released: float | None) -> GaussianPlan:
        made = mechanism_for(cfg).plan(
            num_samples=597,
            units=597,
            dim=0,
            feature_dim=0,
            num_classes=0,
            remember=lambda planner, **arguments: planner(**arguments),
            released=released,
        )
        assert isinstance(made, GaussianPlan)
        return made

    assert plan(700.2).sample_rate == 1 / 11 != plan(None).sample_rate == 1 / 10  # ⌈700/64⌉ = 11, ⌈597/64⌉ = 10
    assert plan(700.2).steps_per_round == 10 * 11
    assert plan(700.2).stats_noise_multiplier == plan(None).stats_noise_multiplier  # round 0 needs no count
