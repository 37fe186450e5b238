"""The 95% intervals every reported score carries: Wilson (accuracy) and Hanley-McNeil (AUROC), on known values."""

from __future__ import annotations

import numpy as np
import pytest
from fedtransfer.common.model.intervals import (
    accuracy_interval,
    auroc_interval,
    described,
    described_accuracy,
    hanley_mcneil_se,
    wilson,
    with_intervals,
)
from fedtransfer.server.federation.console import round_summary


@pytest.mark.parametrize(
    ("successes", "n", "expected"),
    [
        (81, 263, (0.2553, 0.3662)),  # the worked example of Wilson's interval (statsmodels' proportion_confint)
        (0, 10, (0.0, 0.2775)),  # no success: the interval still has width, unlike Wald's [0, 0]
        (10, 10, (0.7225, 1.0)),
        (39, 43, (0.7840, 0.9632)),  # the 43-record hold-out: 0.907 could be 0.78
    ],
)
def test_wilson_matches_published_values(successes: int, n: int, expected: tuple[float, float]) -> None:
    low, high = wilson(successes, n)
    assert low == pytest.approx(expected[0], abs=5e-4)
    assert high == pytest.approx(expected[1], abs=5e-4)


def test_wilson_refuses_impossible_counts_and_says_nothing_was_measured_on_no_records() -> None:
    assert wilson(0, 0) is None
    with pytest.raises(ValueError, match=r"0\.\.5"):
        wilson(6, 5)


def test_hanley_mcneil_reproduces_the_papers_example() -> None:
    """Hanley & McNeil (1982), Radiology 143:29-36: area 0.893 on 51 abnormal and 58 normal images, SE 0.032."""
    assert hanley_mcneil_se(0.893, 51, 58) == pytest.approx(0.032, abs=1e-3)


def test_auroc_interval_narrows_with_records_and_stays_in_the_unit_interval() -> None:
    small = auroc_interval(0.8, [20, 20])
    large = auroc_interval(0.8, [2000, 2000])
    assert small is not None and large is not None
    assert small[0] < large[0] < 0.8 < large[1] < small[1]
    assert auroc_interval(0.99, [3, 3])[1] == 1.0  # clipped
    assert auroc_interval(None, [5, 5]) is None
    assert auroc_interval(0.9, [10, 0]) is None  # one class present: no AUROC exists


def test_with_intervals_adds_the_record_count_and_both_intervals() -> None:
    labels = np.array([0] * 30 + [1] * 13)
    out = with_intervals({"accuracy": 39 / 43, "auroc": 0.9, "loss": 0.3}, labels)
    assert out["records"] == 43 and out["loss"] == 0.3
    assert out["accuracy_interval95"] == pytest.approx([0.7840, 0.9632], abs=5e-4)
    se = np.mean([hanley_mcneil_se(0.9, 30, 13), hanley_mcneil_se(0.9, 13, 30)])
    assert out["auroc_interval95"] == pytest.approx([0.9 - 1.96 * se, min(1.0, 0.9 + 1.96 * se)], abs=1e-3)
    assert described(out["accuracy"], out["accuracy_interval95"], 43) == "0.907 [0.784, 0.963] on 43 records"
    assert described(None, None, 43) == "-"


def test_accuracy_interval_rounds_to_whole_records_and_knows_when_nothing_was_measured() -> None:
    assert accuracy_interval(39 / 43, 43) == pytest.approx([0.7840, 0.9632], abs=5e-4)
    assert accuracy_interval(0.5, 0) is None and accuracy_interval(None, 10) is None
    assert accuracy_interval(float("nan"), 10) is None


def test_the_round_line_and_the_final_line_say_on_how_many_records_with_the_interval() -> None:
    line = round_summary(
        3,
        5,
        trained=4,
        asked=4,
        server_accuracy=39 / 43,
        sites_accuracy=0.755,
        epsilon_max=2.0,
        target_epsilon=3.0,
        seconds=1.0,
        server_measured=(accuracy_interval(39 / 43, 43), 43),
        sites_measured=(accuracy_interval(0.755, 106), 106),
    )
    assert "server acc 0.9070 [0.784, 0.963] on 43 |" in line
    low, high = accuracy_interval(0.755, 106)
    assert f"sites' acc 0.7550 [{low:.3f}, {high:.3f}] on 106 |" in line
    status = {"final_accuracy": 39 / 43, "final_metrics": with_intervals({"accuracy": 39 / 43}, np.zeros(43))}
    assert described_accuracy(status["final_accuracy"], status["final_metrics"]) == "0.907 [0.784, 0.963] on 43 records"
    assert described_accuracy(0.9, None) == "0.900"  # a status.json written before intervals
