"""Robust aggregation over a whole run: one site sends NaNs, one a 100× head.

The same 8-site federation runs twice with `fedtrimmedavg`: all sites honest, then with
partitions 0 and 1 hostile (`tests/hostile_client.py`). The NaN update is refused and named;
the scaled one is trimmed; accuracy ends within 2 points of the honest run. What is under test
is what the server does with the replies, so the ServerApp and every site's ClientApp answer in
this process (tests/inprocess_grid.py); the Simulation Engine itself is tests/test_simulation.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fedtransfer.common.config.run import RunConfig, config_from_dict

from tests import hostile_client
from tests.inprocess_grid import InProcessGrid, run_in_process


def _config(run: Path, cache: Path) -> RunConfig:
    return config_from_dict(
        {
            "run_name": "robust",
            "output_dir": str(run),
            "cache_dir": str(cache),
            "backbone": {"image_size": 32},
            "data": {"num_sites": 8, "split": "iid"},
            "train": {
                "rounds": 3,
                "local_epochs": 5,
                "strategy": "fedtrimmedavg",
                "trimmed_beta": 0.2,
                "fraction_evaluate": 0.0,
                "protocol": "fedavg",
                "learning_rate": 0.5,
            },
            "privacy": {"feature_stats": False, "accountant": "rdp"},
        }
    )


def _rounds(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.usefixtures("app_process_umask")
def test_trimmed_mean_survives_a_nan_site_and_a_scaled_site(tmp_path: Path) -> None:
    honest = run_in_process(_config(tmp_path / "honest", tmp_path / "cache"))
    cfg = _config(tmp_path / "attacked", tmp_path / "cache")
    grid = InProcessGrid.for_simulation(cfg)
    for partition in (hostile_client.NAN_SITE, hostile_client.SCALED_SITE):
        grid.answers[grid.node(partition)] = hostile_client.app
    attacked = run_in_process(cfg, grid)
    for record in _rounds(tmp_path / "attacked"):
        assert record["sites_trained"] == 7  # the scaled head passes the checks; the trimmed mean cuts it
        assert record["sites"]["site-0"]["status"] == "refused"  # it sent an update; the server's screening refused it
        assert "holds NaN or Inf values" in record["sites"]["site-0"]["reason"]
    print(f"accuracy: honest {honest['final_accuracy']:.4f}, attacked {attacked['final_accuracy']:.4f}")
    assert honest["final_accuracy"] > 0.6
    assert attacked["final_accuracy"] >= honest["final_accuracy"] - 0.02
