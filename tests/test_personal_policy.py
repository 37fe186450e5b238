"""The site's own choice for its personal model (policy.personal), checked against what its audit log records.

The site follows its file when it trains (client/site_model/personal.py); the auditor checks the site's
`personal-trained` records against the same file with the same function the site's policy uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fedtransfer.cli.main import main
from fedtransfer.common.config.run import SitePolicy
from fedtransfer.common.config.site import SitePersonal
from fedtransfer.common.privacy.policy import PersonalUse, PolicyUse, personal_uses, policy_violations
from fedtransfer.common.storage.audit_log import AuditLog
from fedtransfer.common.wire.protocol import Event

from tests.synthetic_run import RUN_ID, RunSpec, write_run

DP_PLAN = {
    "noise_multiplier": 1.1,
    "sample_rate": 0.1,
    "steps": 20,
    "max_grad_norm": 1.0,
    "target_epsilon": 3.0,
    "target_delta": 1e-5,
    "accountant": "rdp",
}


def _use(*personal: PersonalUse) -> PolicyUse:
    return PolicyUse(
        rounds=2,
        without_dp=False,
        plain_aggregation=False,
        delta=1e-5,
        epsilon=1.0,
        epsilon_earlier=0.0,
        epsilon_scope="this run",
        personal=personal,
    )


@pytest.mark.parametrize(
    ("own", "use", "violation"),
    [
        (SitePersonal(), PersonalUse("round 1", False, None, None), None),
        (SitePersonal(dp=False), PersonalUse("round 1", False, None, None), None),
        (SitePersonal(dp=True, target_epsilon=3.0), PersonalUse("round 2", True, 3.0, 2.1), None),
        (
            SitePersonal(dp=True),
            PersonalUse("round 2", False, None, None),
            "round 2: the personal model trained without DP, but policy.personal.dp is true",
        ),
        (
            SitePersonal(dp=False),
            PersonalUse("round 1", True, 3.0, 1.0),
            "round 1: the personal model trained with DP, but policy.personal.dp is false",
        ),
        (
            SitePersonal(target_epsilon=2.0),
            PersonalUse("round 3", True, 3.0, 2.5),
            "round 3: the personal model's ε (target 3, spent 2.5) > policy.personal.target_epsilon 2",
        ),
        (SitePersonal(keep=True), PersonalUse("round 1", True, 3.0, 1.0), None),
        (
            SitePersonal(keep=False),
            PersonalUse("round 2", False, None, None),
            "round 2: a personal model trained, but policy.personal.keep is false",
        ),
        (
            SitePersonal(keep=False),
            PersonalUse("round 1", True, 3.0, 1.0),
            "round 1: a personal model trained, but policy.personal.keep is false",
        ),
    ],
)
def test_a_personal_training_against_the_sites_choice_is_a_violation(
    own: SitePersonal, use: PersonalUse, violation: str | None
) -> None:
    found = policy_violations(SitePolicy(personal=own), _use(use))
    assert found == ([] if violation is None else [violation])


def test_records_without_a_stated_dp_choice_count_as_without_dp() -> None:
    records = [
        {"round": 1, "dp_chosen": True, "dp": DP_PLAN, "epsilon": 1.2},
        {"round": 2, "dp_chosen": True, "dp": None, "epsilon": None},
        {"round": 3},
    ]
    assert personal_uses(records) == (
        PersonalUse("round 1", True, 3.0, 1.2),
        PersonalUse("round 2", False, None, None),
        PersonalUse("round 3", False, None, None),
    )


def _run_with_personal(tmp_path: Path, dp: bool) -> Path:
    """A written honest run whose site-0 also trained its personal model each round, with or without DP."""
    run = write_run(tmp_path / "run", RunSpec())
    log = AuditLog(run / "sites" / "site-0" / "audit.jsonl")
    for rnd in (1, 2):
        log.append(
            Event.PERSONAL_TRAINED,
            run_id=RUN_ID,
            site="site-0",
            round=rnd,
            message_type="evaluate",
            dp_chosen=dp,
            dp_chosen_by="site",
            target_epsilon_chosen_by="site" if dp else None,
            dp=DP_PLAN if dp else None,
            epsilon=0.8 * rnd if dp else None,
        )
    return run


def _audit(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], **personal: Any) -> tuple[int, str]:
    config = tmp_path / "site-0.yaml"
    config.write_text(
        json.dumps(
            {
                "name": "site-0",
                "data_source": "mnist",
                "state_dir": str(tmp_path / "state"),
                "policy": {"max_delta": 1e-3, "personal": personal},
            }
        )
    )
    code = main(["audit", str(run), "--site-config", str(config), "--report-dir", str(tmp_path / "report")])
    return code, capsys.readouterr().out


def test_the_audit_checks_the_personal_records_against_the_site_file(tmp_path: Path, capsys) -> None:
    run = _run_with_personal(tmp_path, dp=False)
    code, out = _audit(run, tmp_path, capsys)
    assert code == 0, out
    code, out = _audit(run, tmp_path, capsys, dp=False)
    assert code == 0, out
    code, out = _audit(run, tmp_path, capsys, dp=True)
    assert code == 1
    config = tmp_path / "site-0.yaml"
    for rnd in (1, 2):
        assert (
            f"FAIL [policy] {config}: site-0: round {rnd}: the personal model trained without DP, but "
            "policy.personal.dp is true"
        ) in out


def test_the_audit_passes_a_dp_personal_model_within_the_sites_budget(tmp_path: Path, capsys) -> None:
    run = _run_with_personal(tmp_path, dp=True)
    code, out = _audit(run, tmp_path, capsys, dp=True, target_epsilon=3.0)
    assert code == 0, out
    code, out = _audit(run, tmp_path, capsys, dp=True, target_epsilon=1.0)
    assert code == 1
    assert "round 2: the personal model's ε (target 3, spent 1.6) > policy.personal.target_epsilon 1" in out


def test_the_audit_fails_a_personal_model_the_site_declined_to_keep(tmp_path: Path, capsys) -> None:
    run = _run_with_personal(tmp_path, dp=False)
    code, out = _audit(run, tmp_path, capsys, keep=False)
    assert code == 1
    config = tmp_path / "site-0.yaml"
    for rnd in (1, 2):
        assert (
            f"FAIL [policy] {config}: site-0: round {rnd}: a personal model trained, but policy.personal.keep is false"
        ) in out
    honest = write_run(tmp_path / "declined", RunSpec())  # the site kept none: only its choice is on record
    AuditLog(honest / "sites" / "site-0" / "audit.jsonl").append(
        Event.PERSONAL_NOT_KEPT,
        run_id=RUN_ID,
        site="site-0",
        round=1,
        message_type="evaluate",
        keep_chosen_by="site",
        run_proposed=True,
    )
    code, out = _audit(honest, tmp_path, capsys, keep=False)
    assert code == 0, out
