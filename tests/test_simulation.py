"""End to end on Flower's Simulation Engine: `fedtransfer simulate` and `flwr run .` (real Ray, real SuperLink)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from fedtransfer.cli.main import main
from fedtransfer.common.config.run import RunConfig, config_from_dict
from fedtransfer.common.data.federation import federation_for
from fedtransfer.common.privacy.calibration import epsilon_of
from fedtransfer.common.privacy.counts import round_zero_release
from fedtransfer.common.privacy.events import gaussian_steps
from fedtransfer.common.storage.audit_log import read_records, verify_chain
from fedtransfer.server.export.model_file import load_model
from fedtransfer.server.launch.app_folder import CHECKOUT as APP_DIR
from fedtransfer.server.launch.launcher import flower_bin, flower_env
from fedtransfer.server.launch.simulation import simulation_superlink

SMALL = {
    "run_name": "e2e",
    "backbone": {"image_size": 32},
    "data": {"num_sites": 2, "max_samples": 900, "split": "iid"},
    "train": {"rounds": 2, "local_epochs": 5, "protocol": "fedavg", "learning_rate": 0.5},  # fedsgd: test_fedsgd.py
    "privacy": {"target_epsilon": 3.0, "target_delta": 1.0e-4, "feature_stats": False, "accountant": "rdp"},
}


def _check_outputs(run_dir: Path, cfg: RunConfig, sites: int) -> None:
    for name in ("metrics.jsonl", "privacy.json", "model.pt", "accuracy.png", "epsilon.png", "status.json"):
        assert (run_dir / name).is_file(), name
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = 0 if round_zero_release(cfg.privacy) is not None else 1  # round 0: the statistics or DP record counts
    assert [m["round"] for m in metrics] == list(range(first, cfg.train.rounds + 1))
    assert all(m["sites_trained"] == sites and m["bytes_received"] > 0 for m in metrics)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        f"round-{r:04d}.pt" for r in range(first, cfg.train.rounds + 1)
    ]

    privacy = json.loads((run_dir / "privacy.json").read_text())["sites"]
    assert len(privacy) == sites
    for name, site in privacy.items():
        # the ε a site reports is its accountant over every round it trained (round 0's release too), recomputed
        # here independently from each round's DP record
        history = [
            gaussian_steps(r["noise_multiplier"], r["sample_rate"], r["steps"])
            for r in site["per_round"]
            if r["status"] == "trained"
        ]
        assert site["epsilon"] == pytest.approx(epsilon_of(history, site["delta"], site["accountant"]), rel=1e-9)
        assert site["epsilon"] == pytest.approx(site["epsilon_recomputed"], rel=1e-9)
        assert 0.8 * cfg.privacy.target_epsilon < site["epsilon"] <= cfg.privacy.target_epsilon + 1e-9
        assert site["rounds_trained"] == list(range(first, cfg.train.rounds + 1))
        ledger = json.loads((run_dir / "sites" / name / "privacy-ledger.json").read_text())
        (entry,) = ledger["runs"].values()
        assert entry["rounds"][-1]["epsilon"] == pytest.approx(site["epsilon"], rel=1e-12)

    # hash-chained audit logs at the server and at every site, and their update hashes match record by record
    assert verify_chain(run_dir / "audit.jsonl") == []
    received = {
        (r["site"], r["round"]): r["update"]["sha256"]
        for r in read_records(run_dir / "audit.jsonl")
        if r["event"] == "update-received"
    }
    sent = {}
    for name in privacy:
        log = run_dir / "sites" / name / "audit.jsonl"
        assert verify_chain(log) == []
        for r in read_records(log):
            if r["event"] == "update-sent":
                sent[(name, r["round"])] = r["update"]["sha256"]
                if r["round"] > 0:  # round 0 sends its release (the statistics or the record counts), not the head
                    assert [t["name"] for t in r["update"]["tensors"]] == ["head.1.bias", "head.1.weight"]
    assert sent == received and len(sent) == sites * (cfg.train.rounds + 1 - first)

    # the exported model classifies the server's held-out images from raw pixels, better than chance
    fed = federation_for(cfg, sites)
    model = load_model(run_dir / "model.pt")
    predicted = np.array(model.predict(fed.server_test.inputs))
    truth = np.array([fed.server_test.classes[i] for i in fed.server_test.labels])
    assert (predicted == truth).mean() > 0.3  # chance is 0.1


def test_fedtransfer_simulate_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What a user of `fedtransfer simulate` relies on: a short console, a completed status, every output,
    one record per round, each site's ε within its target, and an audit that passes."""
    run_dir = tmp_path / "run"
    raw = SMALL | {"output_dir": str(run_dir), "cache_dir": str(tmp_path / "cache")}
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["simulate", "--config", str(config)]) == 0
    console = capsys.readouterr().out.splitlines()
    rounds = [line.split(" | ")[0] for line in console if line.startswith("round ")]
    assert rounds == ["round 0/2", "round 1/2", "round 2/2"]  # round 0: the DP record counts
    # start, a line per round, the outcome, a line per site, where outputs are: Flower's and Ray's logs are in run.log
    assert len(console) <= 9, console
    assert "Initialising: RayBackend" in (run_dir / "run.log").read_text()

    cfg = config_from_dict(raw)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "completed" and f"run {status['run_id']} completed" in console[-4]
    # then each site's own-test scores alone, global and final (simulation only), then where the outputs are
    assert [line.split(":")[1].strip() for line in console[-3:-1]] == ["site-0", "site-1"]
    assert all("alone" in line and "global" in line and "final" in line for line in console[-3:-1])
    assert 0.3 < status["final_accuracy"] <= 1  # chance is 0.1
    _check_outputs(run_dir, cfg, sites=2)
    assert main(["audit", str(run_dir)]) == 0, capsys.readouterr()


def test_flwr_run_dot_uses_the_same_apps(tmp_path: Path) -> None:
    """`flwr run .` from the repository root, with the embedded config overridden on the command line."""
    out = tmp_path / "flwr-run"
    overrides = (
        f"output_dir='{out}' cache_dir='{tmp_path / 'cache'}' backbone.image_size=32 data.max_samples=900 "
        "data.split='iid' train.rounds=2 train.local_epochs=5 privacy.target_delta=1.0e-4 train.protocol='fedavg' "
        "train.learning_rate=0.5 privacy.feature_stats=false privacy.accountant='rdp'"
    )
    flwr_home = tmp_path / ".flwr"
    with simulation_superlink(flwr_home, tmp_path / "superlink.log") as connection:
        done = subprocess.run(
            [
                flower_bin("flwr"),
                "run",
                ".",
                connection,
                "--run-config",
                overrides,
                "--stream",
                "--federation-config",
                "num-supernodes=2 client-resources-num-cpus=1",
            ],
            cwd=APP_DIR,
            env=flower_env(flwr_home),
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "status.json").read_text())["status"] == "completed", done.stdout[-3000:]
    cfg = config_from_dict(SMALL | {"run_name": "demo", "output_dir": str(out), "cache_dir": str(tmp_path / "cache")})
    _check_outputs(out, cfg, sites=2)
