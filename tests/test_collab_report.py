"""A site's collaboration report (client/site_model/report.py): its own-test scores alone, global and final,
kept home."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fedtransfer.client.evaluate_round import evaluate
from fedtransfer.client.site_model.report import read_report, scored, summary_lines
from fedtransfer.client.train_round import local_head
from fedtransfer.common.model.head import evaluate_head
from fedtransfer.common.storage.audit_log import read_records
from fedtransfer.common.wire.exchange import head_to_arrays

from tests.test_personal import CLASSES, _cfg, _message, _site


def test_the_report_holds_alone_global_and_final_on_the_own_test_split_with_counts_and_intervals(
    tmp_path: Path,
) -> None:
    site, cfg = _site(tmp_path), _cfg(dp=False)
    global_model = local_head(site, cfg, None, CLASSES)
    arrays = head_to_arrays(global_model)
    for rnd in (1, 2, 3):  # the final model is chosen after the last round (cfg.train.rounds = 3)
        evaluate(site, cfg, _message(rnd, arrays))
    report = read_report(tmp_path)
    assert report is not None and report["round"] == 3 and report["test_records"] == len(site.test_y)
    assert set(report["scores"]) == {"alone", "global", "final"}
    for score in report["scores"].values():
        assert score["records"] == len(site.test_y)
        low, high = score["accuracy"]["interval95"]
        assert low <= score["accuracy"]["value"] <= high
    expected_global = evaluate_head(global_model, site.test_x, site.test_y).accuracy
    assert report["scores"]["global"]["accuracy"]["value"] == pytest.approx(expected_global)
    assert report["chosen"] in {c["name"] for c in report["validation"]} and report["reason"]
    assert report["scores"]["final"]["accuracy"]["value"] > expected_global  # an untrained global model loses
    page = (tmp_path / "collaboration.html").read_text()
    assert report["chosen"] in page and "<script" not in page and "http" not in page
    assert json.loads((tmp_path / "collaboration.json").read_text()) == report
    assert not any(r["event"] == "update-sent" for r in read_records(site.audit_path))  # nothing left the site


def test_an_interval_narrows_with_more_records() -> None:
    rng = np.random.default_rng(0)
    intervals = []
    for n in (50, 2000):
        truth = rng.integers(0, 2, n)
        probs = np.where(rng.random(n) < 0.8, truth, 1 - truth).astype(float)
        probs = np.stack([1 - probs, probs], axis=1)
        low, high = scored(truth, probs)["accuracy"]["interval95"]
        intervals.append(high - low)
    assert intervals[1] < intervals[0] / 3


def test_a_folder_without_a_report_has_none(tmp_path: Path) -> None:
    assert read_report(tmp_path) is None


def test_a_simulation_prints_each_sites_own_test_alone_global_and_final_of_this_run_only(tmp_path: Path) -> None:
    def report(site: str, run_id: str) -> dict:
        score = {"records": 40, "accuracy": {"value": 0.5, "interval95": [0.4, 0.6]}}
        scores = {"alone": score, "global": {**score, "accuracy": {"value": 0.75, "interval95": [0.6, 0.9]}}}
        scores["final"] = {**score, "accuracy": {"value": 0.8, "interval95": [0.7, 0.9]}}
        return {"site": site, "run_id": run_id, "test_records": 40, "scores": scores, "chosen": "pull 0.1"}

    for name, run_id in (("site-1", "r1"), ("site-0", "r1"), ("site-2", "older")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "collaboration.json").write_text(json.dumps(report(name, run_id)))
    (tmp_path / "site-3").mkdir()  # kept no final model: no report
    lines = summary_lines(tmp_path, "r1")
    assert [line.split(":")[0] for line in lines] == ["site-0", "site-1"]
    assert "alone 0.500 [0.400, 0.600], global 0.750 [0.600, 0.900], final 0.800 [0.700, 0.900]" in lines[0]
    assert "(40 records)" in lines[0]
