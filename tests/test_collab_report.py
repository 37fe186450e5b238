"""A site's collaboration report (client/collab_report.py): its own-test scores alone, global and final, kept home."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fedtransfer.client.collab_report import read_report, scored
from fedtransfer.client.handlers import _evaluate
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
        _evaluate(site, cfg, _message(rnd, arrays))
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
