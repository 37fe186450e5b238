"""Robust aggregation end to end on the Simulation Engine: one site sends NaNs, one a 100× head.

The same 8-site federation runs twice with `fedtrimmedavg`: all sites honest, then with
partitions 0 and 1 hostile (`tests/hostile_client.py`). The NaN update is refused and named;
the scaled one is trimmed; accuracy ends within 2 points of the honest run.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedtransfer.common.config.run import RunConfig, config_from_dict
from fedtransfer.server.launch.simulation import simulate

from tests.app_variants import app_variant


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


def test_trimmed_mean_survives_a_nan_site_and_a_scaled_site(tmp_path: Path) -> None:
    honest = simulate(_config(tmp_path / "honest", tmp_path / "cache"), stream=False)
    hostile_app = app_variant(
        tmp_path / "app", Path(__file__).with_name("hostile_client.py"), clientapp="hostile_client:app"
    )
    attacked = simulate(_config(tmp_path / "attacked", tmp_path / "cache"), stream=False, app_dir=hostile_app)
    for record in _rounds(tmp_path / "attacked"):
        assert record["sites_trained"] == 7  # the scaled head passes the checks; the trimmed mean cuts it
        assert record["sites"]["site-0"]["status"] == "refused"  # it sent an update; the server's screening refused it
        assert "holds NaN or Inf values" in record["sites"]["site-0"]["reason"]
    print(f"accuracy: honest {honest['final_accuracy']:.4f}, attacked {attacked['final_accuracy']:.4f}")
    assert honest["final_accuracy"] > 0.6
    assert attacked["final_accuracy"] >= honest["final_accuracy"] - 0.02
