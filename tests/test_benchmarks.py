"""Smoke runs of every benchmark script, tiny sizes: they keep working and write their JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.harness import RESULTS_ENV

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "benchmarks" / "results"
# Each smoke run below runs its benchmark as a process: tests/conftest.py marks those slow


def _run(module: str, *args: str, timeout: int = 600) -> dict:
    """Run one benchmark with its results sent to a temporary folder; return the one JSON it wrote there.

    The committed full-size results in benchmarks/results/ must come out byte for byte as they went in.
    """
    committed = {p.name: p.read_bytes() for p in COMMITTED.glob("*.json")}
    with tempfile.TemporaryDirectory(prefix="bench-smoke-") as folder:
        done = subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=ROOT,
            env=os.environ | {RESULTS_ENV: folder},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        (path,) = Path(folder).glob("*.json")
        assert f"written: {path}" in done.stdout
        result = json.loads(path.read_text())
    assert {p.name: p.read_bytes() for p in COMMITTED.glob("*.json")} == committed
    return result


def test_communication_head_is_near_the_floor_and_far_below_full_model() -> None:
    rows = {r["backbone"]: r for r in _run("benchmarks.communication")["rows"]}
    assert rows["mobilenet_v2"]["over_floor_pct"] < 10
    assert rows["mobilenet_v2"]["full_over_head"] > 100


def test_round_time_smoke() -> None:
    rows = _run("benchmarks.round_time", "--sizes", "32", "--samples", "16", "--rounds", "2", "--epochs", "1")["rows"]
    assert [r["round"] for r in rows] == [1, 2, "run"]
    assert all(r["fedtransfer_s"] > 0 and r["usual_s"] > 0 for r in rows)


def test_accuracy_smoke() -> None:
    args = (
        "--question",
        "epsilon",
        "--sites",
        "2",
        "--epsilons",
        "3",
        "--rounds",
        "1",
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--limit",
        "300",
    )
    rows = _run("benchmarks.accuracy", *args)["rows"]
    assert {r["split"] for r in rows} == {"iid", "dirichlet"}
    assert all(0 <= r["transfer"] <= 1 and 0 <= r["ceiling"] <= 1 for r in rows)


def test_accuracy_target_smoke() -> None:
    args = ("--question", "target", "--accountants", "rdp", "--image-size", "32", "--limit", "300")
    rows = _run("benchmarks.accuracy", *args)["rows"]
    assert sum(r["phase"].startswith("tune") for r in rows) >= 2
    tested = [r for r in rows if r["phase"].startswith("test")]
    assert {r["split"] for r in tested} == {"iid", "dirichlet"} and all("target_met" in r for r in tested)


def test_accuracy_ablation_smoke() -> None:
    args = ("--question", "ablation", "--image-size", "32", "--limit", "300")
    rows = _run("benchmarks.accuracy", *args)["rows"]
    assert [r["sites"] for r in rows] == [4, 1, 4, 4, 4]  # centralised DP only for the default features
    assert all(0 <= r["accuracy"] <= 1 and r["epsilon"] <= 3.0 + 1e-6 for r in rows)


def test_privacy_utility_smoke() -> None:
    """The 16-site split: fedsgd's grid tuned on validation, then fedavg and fedsgd once on the test set."""
    args = (
        "--splits",
        "iid16",
        "--methods",
        "fedavg",
        "fedsgd+stats",
        "--seeds",
        "0",
        "--epsilons",
        "3",
        "--accountants",
        "prv",
        "--rounds",
        "10",
        "--name",
        "privacy_utility_smoke",
    )
    rows = _run("benchmarks.privacy_utility", *args)["rows"]
    assert sum(r["phase"] == "tune (validation)" for r in rows) == 4  # 10 rounds × q 0.3/1 × lr 0.5/1
    tested = {r["method"]: r for r in rows if r["phase"] == "test"}
    assert set(tested) == {"fedavg", "fedsgd+stats"} and tested["fedsgd+stats"]["accountant"] == "prv"
    assert all(0 <= r["accuracy"] <= 1 and r["epsilon_spent"] <= 3.0 + 1e-6 for r in tested.values())


def test_distributed_trust_smoke() -> None:
    """Distributed trust with the statistics release on the Dirichlet split: tuned, tested, both ε within reach."""
    args = (
        "--splits",
        "dirichlet",
        "--methods",
        "stats",
        "--seeds",
        "0",
        "--epsilons",
        "3",
        "--rounds",
        "2",
        "--name",
        "distributed_trust_smoke",
    )
    rows = _run("benchmarks.distributed_trust", *args)["rows"]
    assert sum(r["phase"] == "tune (validation)" for r in rows) == 2  # 2 rounds × lr 0.5/1
    (tested,) = [r for r in rows if r["phase"] == "test"]
    assert tested["stats"] and tested["k_min"] == 3 and 0 <= tested["accuracy_mean"] <= 1
    assert tested["epsilon_aggregate"] <= 3.0 + 1e-6 < tested["epsilon_individual"]


def test_scale_smoke() -> None:
    rows = _run("benchmarks.scale", "--sites", "3", "--rounds", "2")["rows"]
    assert rows[0]["sites"] == 3 and rows[0]["sites_trained_last_round"] == 3
    assert 0 <= rows[0]["overhead_share"] <= 1 and rows[0]["clientapp_share"] is not None


def test_secure_aggregation_smoke_with_fewer_neighbours_than_sites() -> None:
    """The benchmark's plain and SecAgg+ rows; each site shares its keys with 3 of the 5 (every site is the
    default, which the simulation and deployment tests run)."""
    args = ("--sites", "5", "--rounds", "2", "--num-shares", "3", "--threshold", "2")
    plain, secure = _run("benchmarks.secure_aggregation", *args)["rows"]
    assert (plain["mode"], secure["mode"]) == ("plain", "secagg")
    assert (secure["num_shares"], secure["threshold"]) == (3, 2)
    assert secure["sites_trained"] == plain["sites_trained"] == 5
    assert secure["bytes_per_site"] > plain["bytes_per_site"]  # masked int64 vectors plus keys and shares
    assert abs(secure["accuracy"] - plain["accuracy"]) < 0.02  # quantisation does not move accuracy


def test_finetune_personal_smoke() -> None:
    args = (
        "--question",
        "personal",
        "--modes",
        "head",
        "lora r4",
        "--sites",
        "2",
        "--limit",
        "300",
        "--image-size",
        "32",
        "--rounds",
        "1",
        "--local-epochs",
        "1",
        "--personal-epochs",
        "1",
    )
    rows = _run("benchmarks.finetune", *args)["rows"]
    assert [r["trains"] for r in rows] == ["head", "lora r4"]
    assert all(len(r["per_site"]) == 2 and 0 <= r["personal_mean"] <= 1 for r in rows)


def test_deployed_protocols_run_each_protocol_as_shipped() -> None:
    """`deployed_round --protocols` names each protocol's settings; they must stay those of its shipped config."""
    from fedtransfer.common.config.run import RunConfig, config_from_dict, load_config

    from benchmarks.deployed_round import DEMO, PROTOCOLS, protocol_config

    def settings(cfg: RunConfig) -> tuple:
        t, dp, d = cfg.train, cfg.privacy, cfg.data
        return (
            t.protocol,
            t.rounds,
            t.local_epochs,
            t.batch_size,
            t.learning_rate,
            t.momentum,
            t.sample_rate,
            t.server_momentum,
            t.fraction_evaluate,
            dp.accountant,
            dp.feature_stats,
            dp.feature_stats_share,
            dp.target_epsilon,
            dp.target_delta,
            d.source,
            d.split,
            d.alpha,
            d.num_sites,
            cfg.backbone.image_size,
            cfg.seed,
        )

    shipped = {"fedavg": "demo-fedavg.yaml", "fedsgd": "demo.yaml"}
    built = {p: config_from_dict(protocol_config(Path("/w"), DEMO, s, f"{p}-deployed")) for p, s in PROTOCOLS.items()}
    for protocol, config in shipped.items():
        assert built[protocol].train.protocol == protocol
        assert settings(built[protocol]) == settings(load_config(ROOT / "configs" / config)), protocol
    assert len({(c.output_dir, c.cache_dir) for c in built.values()}) == len(PROTOCOLS)  # each its own folders
    assert built["fedsgd-evaluate5"].train == replace(built["fedsgd"].train, evaluate_every=5)


def test_collaboration_quick_scores_every_site_alone_global_final_and_pooled() -> None:
    """The demo's 4 sites at ε = 3: each model on the site's own test split and on the others' data."""
    result = _run("benchmarks.collaboration", "--quick", "--name", "collaboration_smoke")
    rows = result["rows"]
    assert [r["site"] for r in rows] == [0, 1, 2, 3] and all(r["epsilon"] == 3.0 for r in rows)
    for r in rows:
        scores = [r[f"{m}_{w}"] for m in ("alone", "global", "final", "pooled") for w in ("own", "others")]
        assert all(0 <= s <= 1 for s in scores)
        assert r["gain_own"] == pytest.approx(r["final_own"] - r["alone_own"])
        if r["chosen"] == "alone":  # the site kept going alone: the same model, the same scores
            assert r["final_own"] == pytest.approx(r["alone_own"])
    from fedtransfer.client.site_model.final import GATE_BIASES, MIX_WEIGHTS, PULLS

    candidates = {"global", "alone"} | {f"pull {p:g}" for p in PULLS} | {f"mix {w:g}" for w in MIX_WEIGHTS}
    candidates |= {f"gate {b:g}" for b in GATE_BIASES}
    assert {r["chosen"] for r in result["params"]["raw"]} <= candidates


def test_collaboration_targets_name_each_site_that_misses_issue_29s_bar() -> None:
    from benchmarks.collaboration_targets import verdicts

    def row(fed: str, site: int, train: int, own: float, others: float) -> dict:
        gains = {"gain_own": own, "gain_own_se": 0.01, "gain_others": others, "gain_others_se": 0.01}
        return {"federation": fed, "epsilon": 3.0, "site": site, "train": train, "chosen": "pull 0.1", **gains}

    rows = [row("dirichlet", 0, 900, -0.005, 0.2), row("dirichlet", 1, 900, -0.05, 0.2), row("small", 0, 100, 0.03, 0)]
    rows += [row("bank", i, 1800, g, 0) for i, g in enumerate((-0.01, 0.002, 0.01))]
    rows += [row("small", 0, 100, 0.08, 0) | {"trust": "distributed"}]  # the other trust: judged apart
    rows += [row("text", i, 400, g, 0) for i, g in enumerate((-0.002, -0.001, 0.003))]  # AUROC: judged as the bank
    lines = verdicts([*rows, row("small", 1, 100, 0.3, 0) | {"epsilon": 1.0}])  # another ε: left out
    assert "dirichlet (local): 3 of 4 site targets met" in lines  # site 1 misses its own test split; site 0 both
    assert any(line.startswith("dirichlet (local) site 1 (900 records) own >= alone - SE: NOT met") for line in lines)
    assert "small (local): 0 of 1 site targets met" in lines
    assert "small (distributed): 1 of 1 site targets met" in lines
    assert "bank (local): median site final - alone AUROC +0.0020: met" in lines
    assert "text (local): median site final - alone AUROC -0.0010: NOT met" in lines
