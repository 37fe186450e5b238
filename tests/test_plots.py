"""The run's plots as people read them: rounds are whole numbers on the x axis (no round 1.5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import pytest
from fedtransfer.server.federation import report

matplotlib.use("Agg")


def _metrics(rounds: int) -> list[dict[str, Any]]:
    return [
        {
            "round": r,
            "server": {"accuracy": 0.5 + 0.05 * r, "loss": 1.0},
            "federated": {"accuracy": 0.4 + 0.05 * r},
            "sites": {"site-0": {"status": "trained", "epsilon": 0.6 * r}, "site-1": {"status": "declined"}},
        }
        for r in range(1, rounds + 1)
    ]


def _round_labels(fig: Any) -> list[str]:
    import matplotlib.pyplot as plt

    fig.canvas.draw()
    ax = fig.axes[0]
    low, high = ax.get_xlim()
    labels = [t.get_text() for t, x in zip(ax.get_xticklabels(), ax.get_xticks(), strict=True) if low <= x <= high]
    plt.close(fig)
    return labels


@pytest.mark.parametrize("rounds", [1, 2, 3, 5, 12])
def test_rounds_are_whole_numbers_on_both_plots(rounds: int) -> None:
    for fig in (report.accuracy_figure(_metrics(rounds)), report.epsilon_figure(_metrics(rounds), 3.0)):
        labels = _round_labels(fig)
        assert labels, "no round is labelled"
        assert all(label.lstrip("−-").isdigit() for label in labels), labels


def test_write_plots_writes_both_pngs(tmp_path: Path) -> None:
    paths = report.write_plots(tmp_path, _metrics(3), 3.0)
    assert [p.name for p in paths] == ["accuracy.png", "epsilon.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)
    assert not list(tmp_path.glob(".*.tmp.png"))  # written atomically: no temporary file left
