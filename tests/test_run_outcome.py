"""A run nobody trained in is a failed run: its status, exit code, model and audit verdict all say so.

The ServerApp and each site's real ClientApp in this process (tests/inprocess_grid.py): what is
under test is what the server does with the replies, not the transport. Every site declines every
round (its δ is not below 1/n), so the coordinator never aggregates an update; before the fix this
run ended `completed`, exited 0, exported the random initial head and passed its audit. The exit
code and console line `fedtransfer simulate` makes of a failed status.json are
tests/test_cli.py's `test_launcher_keeps_the_whole_log_and_reads_the_verdict`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fedtransfer.cli.main import main
from fedtransfer.common.config.run import config_from_dict
from fedtransfer.server.audit import audit_run

from tests.inprocess_grid import run_in_process

EVERY_SITE_DECLINES = {
    "run_name": "nobody-trained",
    "device": "cpu",
    "backbone": {"image_size": 32},
    "data": {"source": "digits", "split": "iid", "num_sites": 2, "max_samples": 300},
    "train": {"rounds": 2, "local_epochs": 1, "protocol": "fedavg"},
    "privacy": {"target_epsilon": 3.0, "target_delta": 0.5, "feature_stats": False},  # δ ≥ 1/n: every site declines
}


@pytest.mark.usefixtures("app_process_umask")
def test_a_run_in_which_every_site_declines_fails_everywhere(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = config_from_dict(EVERY_SITE_DECLINES | {"output_dir": str(run_dir), "cache_dir": str(tmp_path / "cache")})
    status = run_in_process(cfg)
    assert status["status"] == "failed" and "train.min_sites" in status["reason"]
    assert status["rounds_aggregated"] == []
    assert not (run_dir / "model.pt").exists(), "a failed run exports no model"

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [0, 1, 2]  # round 0: the record-count release a DP run starts with
    for m in lines:  # every registered site appears in every round, with what it did and why
        assert m["aggregated"] is False and m["sites_trained"] == 0
        assert {n: s["status"] for n, s in m["sites"].items()} == {"site-0": "declined", "site-1": "declined"}
        assert all("target_delta" in s["reason"] for s in m["sites"].values())

    report = audit_run(run_dir, sorted(run_dir.glob("sites/*/audit.jsonl")))
    assert not report.passed
    completion = [f for f in report.failures if f.check == "completion"]
    assert completion and any("failed" in f.reason for f in completion)
    assert main(["audit", str(run_dir), "--report-dir", str(tmp_path / "report")]) == 1
