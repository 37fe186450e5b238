"""Progress of long work: a tqdm bar on a terminal, one line per stage in a log (the canary test uses it)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import fedtransfer.server.audit.empirical as empirical_audit
import numpy as np
import pytest
import torch
from fedtransfer.cli.main import main
from fedtransfer.common.config.run import RunConfig
from fedtransfer.common.progress import Progress, _duration

from tests.synthetic_run import RunSpec, write_run


class Terminal(io.StringIO):
    """What a terminal looks like to tqdm: a stream that says it is a TTY."""

    def isatty(self) -> bool:
        return True


def test_a_log_gets_one_line_per_stage_with_time_left() -> None:
    log = io.StringIO()
    with Progress("empirical test", 4, "rounds", stream=log) as progress:
        progress.step(2)
        progress.stage_done("site-0 with DP")
        progress.step(2)
        progress.stage_done("site-0 control without DP")
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in log.getvalue()
    assert re.fullmatch(r"empirical test: site-0 with DP done \(2/4 rounds, [\d.]+s, about [\d.]+s left\)", lines[0])
    assert re.fullmatch(r"empirical test: site-0 control without DP done \(4/4 rounds, [\d.]+s\)", lines[1])  # all done


def test_a_terminal_gets_a_bar_with_rate_and_time_left() -> None:
    screen = Terminal()
    with Progress("empirical test", 3, "rounds", stream=screen) as progress:
        for _ in range(3):
            progress.step()
        progress.stage_done("site-0 with DP")
    shown = screen.getvalue()
    assert "\r" in shown and "empirical test" in shown and "3/3" in shown
    assert re.search(r"<\d\d:\d\d, +[\d.?]+ ?(rounds/s|s/rounds)", shown), shown  # time left, then the rate
    assert "site-0 with DP done" in shown
    assert "about" not in shown  # no log lines on a terminal


@pytest.mark.parametrize(("seconds", "text"), [(1.23, "1.2s"), (42.4, "42s"), (185, "3m05s"), (3725, "1h02m")])
def test_durations_are_short(seconds: float, text: str) -> None:
    assert _duration(seconds) == text


def _site_features(cfg: RunConfig) -> list[empirical_audit.SiteFeatures]:
    """Stand-ins for the backbone features of the written run's two sites (no torchvision, no data set)."""
    rng = np.random.default_rng(0)
    out = []
    for name in ("site-0", "site-1"):
        labels = rng.integers(0, 10, 120)
        features = np.maximum(rng.random((10, 64))[labels] + 0.5 * rng.standard_normal((120, 64)), 0)
        out.append(
            empirical_audit.SiteFeatures(name, torch.tensor(features, dtype=torch.float32), torch.tensor(labels), 10)
        )
    return out


def test_the_canary_test_reports_each_stage_in_a_log(tmp_path: Path, monkeypatch, capsys) -> None:
    """`fedtransfer audit --empirical` with stderr not a terminal: a line per site and training, rounds counted."""
    run = write_run(tmp_path / "run", RunSpec())
    monkeypatch.setattr(empirical_audit, "simulated_sites", _site_features)
    code = main(["audit", str(run), "--empirical", "--canaries", "40", "--report-dir", str(tmp_path / "report")])
    err = capsys.readouterr().err
    stages = [line for line in err.splitlines() if line.startswith("empirical test: ")]
    assert code == 0, err
    assert [s.split(" done ")[0] for s in stages] == [
        "empirical test: site-0 with DP",
        "empirical test: site-0 control without DP",
        "empirical test: site-1 with DP",
        "empirical test: site-1 control without DP",
    ]
    assert [re.search(r"\((\d+)/8 rounds", s).group(1) for s in stages] == ["2", "4", "6", "8"]
