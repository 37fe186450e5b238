"""The bank-tabular demo end to end on Flower's Simulation Engine (real Ray, real SuperLink), small."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from fedtransfer.cli.main import main
from fedtransfer.common.storage.audit_log import read_records

ROOT = Path(__file__).resolve().parent.parent


def test_bank_tabular_simulate_audit_and_predict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """configs/bank-tabular.yaml, cut down: DP on, the audit passes, only the head left a site, predict reads a CSV."""
    raw = yaml.safe_load((ROOT / "configs" / "bank-tabular.yaml").read_text(encoding="utf-8"))
    run_dir = tmp_path / "run"
    raw |= {"output_dir": str(run_dir), "cache_dir": str(tmp_path / "cache")}
    raw["backbone"]["schema"] = str(ROOT / "configs" / "bank-tabular.schema.yaml")
    raw["data"] |= {"num_sites": 2, "max_samples": 2000}
    raw["train"] |= {"rounds": 2, "local_epochs": 3}
    raw["privacy"] |= {"target_delta": 1.0e-4}
    config = tmp_path / "bank.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["simulate", "--config", str(config), "--quiet"]) == 0

    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "completed" and status["final_accuracy"] > 0.9  # about 3% of card holders default
    privacy = json.loads((run_dir / "privacy.json").read_text())["sites"]
    assert sorted(privacy) == ["site-0", "site-1"]
    assert all(0.8 * 3.0 < site["epsilon"] <= 3.0 + 1e-9 for site in privacy.values())
    for name in privacy:  # the head-only evidence the audit checks: the sites sent the head's tensors, nothing else
        sent = [
            r
            for r in read_records(run_dir / "sites" / name / "audit.jsonl")
            if r["event"] == "update-sent" and r["round"] > 0  # round 0: the DP record counts, not the head
        ]
        assert len(sent) == 2
        assert all([t["name"] for t in r["update"]["tensors"]] == ["head.1.bias", "head.1.weight"] for r in sent)
    capsys.readouterr()
    assert main(["audit", str(run_dir)]) == 0, capsys.readouterr()
    assert "head-only" in (run_dir / "audit-report.json").read_text()

    rows = tmp_path / "applicants.csv"
    rows.write_text("student,balance,income\nNo,300,52000\nYes,2600,9000\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["predict", str(run_dir / "model.pt"), str(rows)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["2", "3"]  # file lines, the header being line 1
    assert all(line.split("\t")[1] in ("No", "Yes") for line in lines)
