"""`fedtransfer audit`: tamper evidence, update matching, head-only, privacy claims, policy, empirical ε bound.

One small real simulation is shared by every test that needs a run (module-scoped fixture);
each of those tests tampers with its own copy. The empirical tests that only need a head's
training run on synthetic features and take about a second.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fedtransfer.server.audit.empirical as empirical_audit
import numpy as np
import pytest
import torch
from fedtransfer.cli.main import main
from fedtransfer.common.config.run import config_from_dict, load_site_config
from fedtransfer.common.privacy.calibration import epsilon_of
from fedtransfer.common.privacy.dp_sgd import TrainOutcome
from fedtransfer.common.privacy.events import gaussian_steps
from fedtransfer.common.privacy.mechanisms import fedavg_local
from fedtransfer.common.storage.audit_log import record_hash
from fedtransfer.common.storage.finite_json import finite
from fedtransfer.server.audit.empirical import CanarySettings, audit_training
from fedtransfer.server.launch.simulation import simulate

from tests.synthetic_run import DP, RUN_ID, RunSpec, run_epsilon, write_run

SMALL = {
    "run_name": "audit",
    "backbone": {"image_size": 32},
    "data": {"num_sites": 2, "max_samples": 900, "split": "iid"},
    "train": {"rounds": 2, "local_epochs": 5, "protocol": "fedavg", "learning_rate": 0.5},  # fedsgd: test_fedsgd.py
    "privacy": {"target_epsilon": 3.0, "target_delta": 1.0e-4, "feature_stats": False, "accountant": "rdp"},
}
SITE_LOG = "sites/site-0/audit.jsonl"
SERVER_LOG = "audit.jsonl"


@pytest.fixture(scope="module")
def honest_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real 2-site, 2-round DP simulation; never modified by the tests."""
    root = tmp_path_factory.mktemp("audit-run")
    cfg = config_from_dict(SMALL | {"output_dir": str(root / "run"), "cache_dir": str(root / "cache")})
    assert simulate(cfg, stream=False)["status"] == "completed"
    return root / "run"


@pytest.fixture
def run(honest_run: Path, tmp_path: Path) -> Path:
    """A private copy of the honest run to tamper with."""
    ignore = shutil.ignore_patterns(".flwr", "checkpoints", "*.png", "*.log", "audit-report.*")
    return Path(shutil.copytree(honest_run, tmp_path / "run", ignore=ignore))


def _audit(run_dir: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, dict[str, Any]]:
    code = main(["audit", str(run_dir), "--report-dir", str(run_dir / "report"), *extra])
    out = capsys.readouterr().out
    report = json.loads((run_dir / "report" / "audit-report.json").read_text())
    return code, out, report


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def _line_of(path: Path, event: str, nth: int = 0, **fields: Any) -> int:
    """1-based line number of the nth record with this event (and these field values)."""
    records = [(i, json.loads(line)) for i, line in enumerate(_lines(path), start=1)]
    numbers = [i for i, r in records if r["event"] == event and all(r.get(k) == v for k, v in fields.items())]
    return numbers[nth]


def _rechain(path: Path, edit: Callable[[list[dict[str, Any]]], None]) -> None:
    """Rewrite a log with a valid chain after `edit`: what anyone holding the whole file can do."""
    records = [json.loads(line) for line in _lines(path)]
    edit(records)
    prev, out = "0" * 64, []
    for seq, record in enumerate(records, start=1):
        record["seq"], record["prev"] = seq, prev
        record["hash"] = prev = record_hash(record)
        out.append(json.dumps(record, separators=(",", ":")) + "\n")
    path.write_text("".join(out), encoding="utf-8")


def _first(records: list[dict[str, Any]], event: str) -> dict[str, Any]:
    """site-0's first record of this event in a training round (round 0 is its record-count release)."""
    return next(r for r in records if r["event"] == event and r["site"] == "site-0" and r.get("round") != 0)


def test_honest_run_passes_and_writes_html_and_json(honest_run: Path, tmp_path: Path, capsys) -> None:
    code = main(["audit", str(honest_run), "--report-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PASSED" in out and "FAIL" not in out
    report = json.loads((tmp_path / "audit-report.json").read_text())
    assert report["verdict"] == "passed" and report["failures"] == []
    assert {c["check"] for c in report["checks"]} == {
        "chains",
        "updates",
        "head-only",
        "secure-aggregation",
        "completion",
        "privacy",
        "policy",
        "trust",
        "coverage",
    }
    assert report["head"] == ["head.1.bias", "head.1.weight"]
    privacy = json.loads((honest_run / "privacy.json").read_text())["sites"]
    assert [s["name"] for s in report["sites"]] == sorted(privacy) == ["site-0", "site-1"]
    for site in report["sites"]:
        assert site["updates_matched"] == 3 and site["rounds_joined"] == [0, 1, 2] and site["rounds_declined"] == []
        assert site["epsilon_recomputed"] == pytest.approx(privacy[site["name"]]["epsilon"], rel=1e-9)
        assert site["epsilon_recomputed"] <= site["target_epsilon"] == 3.0
        assert [r["steps"] for r in site["rounds"]] == [r["steps"] for r in privacy[site["name"]]["per_round"]]
        assert site["policy_status"] == "no site policy (simulation)"
    html = (tmp_path / "audit-report.html").read_text()
    assert html.count("data:image/png;base64,") == 1 and "PASSED" in html and "<script" not in html
    assert str(honest_run / SITE_LOG) in report["files"]


def _edit(lines: list[str], index: int) -> None:
    lines[index] = lines[index].replace('"round":1', '"round":3')


def _delete(lines: list[str], index: int) -> None:
    del lines[index]


def _swap(lines: list[str], index: int) -> None:
    lines[index], lines[index + 1] = lines[index + 1], lines[index]


@pytest.mark.parametrize("log", [SITE_LOG, SERVER_LOG])
@pytest.mark.parametrize("tamper", [_edit, _delete, _swap], ids=["edit", "delete", "reorder"])
def test_tampered_line_fails_naming_file_and_line(run: Path, capsys, log: str, tamper) -> None:
    path = run / log
    line = _line_of(path, "update-sent" if log == SITE_LOG else "update-received", round=1)
    lines = _lines(path)
    tamper(lines, line - 1)
    path.write_text("".join(lines), encoding="utf-8")
    code, out, report = _audit(run, capsys)
    assert code == 1
    assert f"FAIL [chains] {path}:{line}: " in out
    assert {"check": "chains", "file": str(path), "line": line} in [
        {k: f[k] for k in ("check", "file", "line")} for f in report["failures"]
    ]
    assert report["verdict"] == "failed"


def test_missing_newest_record_is_caught_by_cross_logging(run: Path, capsys) -> None:
    """Dropping a site log's newest lines leaves a valid chain; the server's log still names the update."""
    path = run / "sites/site-1/audit.jsonl"
    last_sent = _line_of(path, "update-sent", nth=1)
    path.write_text("".join(_lines(path)[: last_sent - 1]), encoding="utf-8")
    code, out, _ = _audit(run, capsys)
    assert code == 1 and "[chains]" not in out
    received = _line_of(run / SERVER_LOG, "update-received", site="site-1", round=2)
    assert (
        f"FAIL [updates] {run / SERVER_LOG}:{received}: update from site-1 in round 2 was never logged as sent" in out
    )


def test_forged_update_hash_is_detected(run: Path, capsys) -> None:
    """The site log is rewritten with a valid chain but another update hash: only matching can tell."""
    site_log = run / SITE_LOG
    _rechain(site_log, lambda records: _first(records, "update-sent")["update"].update(sha256="f" * 64))
    code, out, report = _audit(run, capsys)
    assert code == 1 and "[chains]" not in out
    received = _line_of(run / SERVER_LOG, "update-received", site="site-0", round=1)
    (failure,) = report["failures"]
    assert (failure["check"], failure["file"], failure["line"]) == ("updates", str(run / SERVER_LOG), received)
    assert (
        f"but site-0 logged sending ffffffffffffffff… ({site_log}:{_line_of(site_log, 'update-sent', round=1)})" in out
    )


@pytest.mark.parametrize(("log", "event"), [(SITE_LOG, "update-sent"), (SERVER_LOG, "update-received")])
def test_tensor_outside_the_head_is_detected(run: Path, capsys, log: str, event: str) -> None:
    extra = {"name": "backbone.features.0.0.weight", "dtype": "<f4", "shape": [32, 3, 3, 3]}
    _rechain(run / log, lambda records: _first(records, event)["update"]["tensors"].append(extra))
    code, out, _ = _audit(run, capsys)
    assert code == 1
    where = f"{run / log}:{_line_of(run / log, event, site='site-0', round=1)}"
    assert f"FAIL [head-only] {where}: {event} from site-0 in round 1 carries tensor(s) " in out
    assert "['backbone.features.0.0.weight'] that are not part of the head" in out


def test_understated_epsilon_and_swapped_model_are_detected(run: Path, capsys) -> None:
    privacy = json.loads((run / "privacy.json").read_text())
    privacy["sites"]["site-0"]["epsilon"] = 1.0
    (run / "privacy.json").write_text(json.dumps(privacy))
    model = torch.load(run / "model.pt", weights_only=True)
    model["head_state"]["1.bias"] += 1.0
    torch.save(model, run / "model.pt")
    code, out, _ = _audit(run, capsys)
    assert code == 1
    assert f"FAIL [privacy] {run / 'privacy.json'}: site-0: claims ε 1.0, recomputed from its DP parameters 2.99" in out
    assert f"FAIL [completion] {run / 'model.pt'}: its head is not the one the model-exported record" in out


def _site_config(tmp_path: Path, **policy: Any) -> Path:
    path = tmp_path / "site-0.yaml"
    state = tmp_path / "site-0-state"
    path.write_text(json.dumps({"name": "site-0", "data_source": "mnist", "state_dir": str(state), "policy": policy}))
    return path


def test_site_policy_respected_and_violated(honest_run: Path, tmp_path: Path, capsys) -> None:
    permissive = _site_config(tmp_path, max_delta=1e-3, max_epsilon=3.0)
    code, out, report = _audit_config(honest_run, tmp_path, permissive, capsys)
    assert code == 0, out
    site = next(s for s in report["sites"] if s["name"] == "site-0")
    assert site["policy_status"].startswith("respected") and site["policy"]["max_epsilon"] == 3.0
    strict = _site_config(tmp_path, max_delta=1e-3, min_noise_multiplier=50.0)
    code, out, _ = _audit_config(honest_run, tmp_path, strict, capsys)
    assert code == 1
    assert f"FAIL [policy] {strict}: site-0: round 1: noise multiplier " in out
    assert "< policy.min_noise_multiplier 50" in out


def _audit_config(run_dir: Path, out_dir: Path, config: Path, capsys) -> tuple[int, str, dict[str, Any]]:
    code = main(["audit", str(run_dir), "--site-config", str(config), "--report-dir", str(out_dir)])
    return code, capsys.readouterr().out, json.loads((out_dir / "audit-report.json").read_text())


def test_empirical_bound_of_the_honest_run_is_below_the_claim(honest_run: Path, tmp_path: Path, capsys) -> None:
    code = main(["audit", str(honest_run), "--empirical", "--canaries", "400", "--report-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads((tmp_path / "audit-report.json").read_text())
    assert report["empirical_settings"]["num_canaries"] == 400
    for site in report["sites"]:
        dp, control = site["empirical"], site["control"]
        assert dp["eps_lower_bound"] <= dp["claimed_epsilon"] <= 3.0 + 1e-9
        assert control["eps_lower_bound"] > dp["claimed_epsilon"]  # the attack would have caught a run without DP
    assert "empirical ε ≥" in out
    assert (tmp_path / "audit-report.html").read_text().count("data:image/png;base64,") == 4  # ε, bars, 2 × scores


def test_dp_implementation_that_skips_noise_fails_the_audit(honest_run: Path, tmp_path: Path, capsys, monkeypatch):
    """A broken site: it accounts for DP-SGD but trains without noise or clipping."""
    real = fedavg_local.train_head

    def broken(head, features, labels, opts, plan, history, seed, secure_mode=False) -> TrainOutcome:
        outcome = real(head, features, labels, opts, None, history, seed)
        claimed = (
            [*history, gaussian_steps(plan.noise_multiplier, plan.sample_rate, outcome.steps)] if plan else history
        )
        return TrainOutcome(outcome.loss, outcome.steps, claimed)

    monkeypatch.setattr(fedavg_local, "train_head", broken)  # the mechanism the audit replays
    code = main(["audit", str(honest_run), "--empirical", "--canaries", "400", "--report-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1
    assert f"FAIL [empirical] {honest_run / 'config.json'}: site-0: empirical ε lower bound " in out
    assert "at 95% confidence (fedavg, local trust, Gaussian): the DP implementation is broken" in out


# ---------------------------------------------------------------------------- no simulation needed


CANARY_CFG = config_from_dict(
    {
        "train": {"rounds": 2, "local_epochs": 5, "batch_size": 32, "protocol": "fedavg"},  # fedsgd: test_fedsgd.py
        "privacy": {"target_epsilon": 1.0, "target_delta": 1e-4, "accountant": "rdp", "feature_stats": False},
    }
)


def _synthetic_features(n: int = 200, dim: int = 256, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative, class-clustered vectors, like pooled CNN features."""
    rng = np.random.default_rng(0)
    means = rng.random((classes, dim))
    labels = rng.integers(0, classes, n)
    features = np.maximum(means[labels] + 0.5 * rng.standard_normal((n, dim)), 0.0)
    return torch.tensor(features, dtype=torch.float32), torch.tensor(labels)


def test_empirical_bound_of_dp_training_is_at_most_the_claimed_epsilon() -> None:
    x, y = _synthetic_features()
    result = audit_training(x, y, 10, CANARY_CFG, CanarySettings(num_canaries=400))
    assert result.private and result.noise_multiplier is not None and result.noise_multiplier > 1.0
    assert result.claimed_epsilon == pytest.approx(1.0, abs=0.02)  # the accountant's ε for this very training
    assert result.eps_lower_bound <= result.claimed_epsilon and not result.exceeds_claim
    assert result.eps_ceiling > 3.0  # the test could have proved far more than the claim
    assert result.num_included + len(result.scores_out) == 400


def test_empirical_bound_catches_training_without_dp() -> None:
    """Noise off and clipping off while the report is told ε = 1: the bound lands clearly above it."""
    x, y = _synthetic_features()
    result = audit_training(x, y, 10, CANARY_CFG, CanarySettings(num_canaries=400), private=False, claimed_epsilon=1.0)
    assert result.noise_multiplier is None
    assert result.eps_lower_bound > 2.5 and result.exceeds_claim
    assert result.num_correct >= result.num_guesses - 2  # memorised: the attack's guesses are all but perfect


def test_missing_evidence_fails_and_user_errors_are_one_line(tmp_path: Path, capsys) -> None:
    code, out, report = _audit(tmp_path, capsys)
    assert code == 1
    assert f"FAIL [chains] {tmp_path / 'audit.jsonl'}: audit log is missing" in out
    assert f"FAIL [privacy] {tmp_path / 'privacy.json'}: missing" in out
    assert report["verdict"] == "failed"
    assert main(["audit", str(tmp_path / "nowhere")]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"fedtransfer: error: {tmp_path / 'nowhere'}: not a folder (give a run's output_dir)"
    )
    bad = tmp_path / "site.yaml"
    bad.write_text("name: site-0\ndata_source: mnist\npolicy: {max_epsilon: -1}\n")
    assert main(["audit", str(tmp_path), "--site-config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fedtransfer: error: {bad}: policy.max_epsilon: must be > 0 (got -1.0)"]


def test_deployed_site_data_is_read_like_the_site_reads_it(tmp_path: Path) -> None:
    """--empirical at a site: its own data, with paths relative to its config file, features cached there."""
    folder = tmp_path / "site"
    folder.mkdir()
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), np.arange(40) % 4
    np.savez(folder / "data.npz", train_images=images, train_labels=labels)
    config = folder / "site.yaml"
    config.write_text("name: bank-c\ndata_source: npz\ndata_path: data.npz\nstate_dir: state\n")
    cfg = config_from_dict(SMALL | {"output_dir": str(tmp_path / "run")})
    site = empirical_audit.deployed_site(cfg, load_site_config(config), config)
    assert site.name == "bank-c" and site.num_classes == 4
    assert site.features.shape == (32, 1280) and len(site.labels) == 32  # the site's train split: 80% of 40
    assert len(list((folder / "state" / "features").glob("*.pt"))) == 1  # relative to site.yaml, not to the cwd


# ---------------------------------------------------------------------------- written runs: no Flower needed


def _written(tmp_path: Path, **spec: Any) -> Path:
    return write_run(tmp_path / "run", RunSpec(**spec))


def test_a_written_honest_run_passes(tmp_path: Path, capsys) -> None:
    """The builder writes what an honest run writes: the tests below break exactly one thing each."""
    code, out, report = _audit(_written(tmp_path), capsys)
    assert code == 0, out
    assert [s["updates_matched"] for s in report["sites"]] == [3, 3]  # round 0's record-count release, rounds 1-2
    assert report["sites"][0]["epsilon_recomputed"] == pytest.approx(run_epsilon(2), rel=1e-12)


def _edit_site_log(run: Path, edit: Callable[[dict[str, Any]], None], rnd: int = 1) -> None:
    """Change site-0's update-sent record of round `rnd` (the chain rewritten: what its holder can do)."""

    def change(records: list[dict[str, Any]]) -> None:
        edit(next(r for r in records if r["event"] == "update-sent" and r["round"] == rnd))

    _rechain(run / SITE_LOG, change)


@pytest.mark.parametrize(
    ("name", "exact"),
    [("num-examples", 597.0), ("steps", 22.0), ("dp.sample_rate", 1 / 11)],
    ids=["exact-weight", "steps-of-exact-n", "rate-of-exact-n"],
)
def test_a_size_that_does_not_follow_from_the_released_count_fails(
    tmp_path: Path, capsys, name: str, exact: float
) -> None:
    """Issue 23: under DP a weight, or fedavg's DP sample rate and steps, computed from an exact count rather than
    the one released in round 0 (600.4: rate 1/10, 2 × 10 steps) is covered by no release."""
    run = _written(tmp_path)

    def send_exact(record: dict[str, Any]) -> None:
        if name == "dp.sample_rate":
            record["dp"] = record["dp"] | {"sample_rate": exact}
        else:
            record["sent"]["metrics"][name] = exact

    _edit_site_log(run, send_exact)
    code, out, report = _audit(run, capsys)
    assert code == 1
    assert f"site-0 sent metric {name!r} = {exact} in round 1, covered by no release" in out
    rows = [r for r in report["sites"][0]["coverage"] if r["name"] == name and r["round"] == 1]
    assert [r["covered_by"] for r in rows] == ["NOT COVERED"]


def test_without_a_released_count_the_old_weight_of_one_fails(tmp_path: Path, capsys) -> None:
    """Before issue 23 a DP run without the statistics sent weight 1 and fedavg's rate batch/n; with no count
    released in round 0 nothing a site sends about its size is covered."""
    run = _written(tmp_path)

    def drop_release(records: list[dict[str, Any]]) -> None:
        for r in records:
            if r["event"] == "update-sent" and r["round"] == 0:
                r.pop("released_count")
            if r["event"] == "update-sent" and r["round"] == 1:
                r["sent"]["metrics"]["num-examples"] = 1.0

    _rechain(run / SITE_LOG, drop_release)
    code, out, _ = _audit(run, capsys)
    assert code == 1
    for what in ("'num-examples' = 1.0 in round 1", "'dp.sample_rate' = 0.1 in round 1", "'steps' = 20 in round 1"):
        assert f"site-0 sent metric {what}, covered by no release" in out


def test_a_run_that_never_aggregated_an_update_fails(tmp_path: Path, capsys) -> None:
    code, out, _ = _audit(_written(tmp_path, trained={}), capsys)
    assert code == 1
    run = tmp_path / "run"
    assert f"FAIL [completion] {run / 'audit.jsonl'}: no site's update was received in any round" in out
    line = _line_of(run / SERVER_LOG, "round-aggregated", round=1)
    assert (
        f"FAIL [completion] {run / SERVER_LOG}:{line}: round 1 aggregated 0 site(s) [], fewer than train.min_sites = 2"
    ) in out


def test_a_round_below_min_sites_fails(tmp_path: Path, capsys) -> None:
    code, out, _ = _audit(_written(tmp_path, trained={1: ["site-0", "site-1"], 2: ["site-0"]}), capsys)
    assert code == 1
    line = _line_of(tmp_path / "run" / SERVER_LOG, "round-aggregated", round=2)
    assert f"{SERVER_LOG}:{line}: round 2 aggregated 1 site(s) ['site-0'], fewer than train.min_sites = 2" in out
    assert "round 1 aggregated" not in out


def test_a_failed_run_fails_with_its_reason(tmp_path: Path, capsys) -> None:
    status = {"status": "failed", "reason": "round 2: no site trained"}
    code, out, report = _audit(_written(tmp_path, status=status), capsys)
    assert code == 1
    assert f"FAIL [completion] {tmp_path / 'run' / 'status.json'}: run status is 'failed': round 2: no site" in out
    assert [c["passed"] for c in report["checks"] if c["check"] == "completion"] == [False]


def _ledger(tmp_path: Path, runs: dict[str, list[tuple[float, float, int]]]) -> Path:
    """A site config whose state folder holds a ledger with these runs, in this order."""
    state = tmp_path / "site-0-state"
    state.mkdir()
    ledger = {"runs": {key: {"history": [list(h) for h in history], "rounds": []} for key, history in runs.items()}}
    (state / "privacy-ledger.json").write_text(json.dumps(ledger), encoding="utf-8")
    return state


EARLIER, LATER = [(1.0, 0.1, 50)], [(1.0, 0.2, 300)]


@pytest.mark.parametrize("later_runs", [False, True], ids=["alone", "site-ran-again"])
def test_policy_counts_only_runs_before_the_audited_one(tmp_path: Path, capsys, later_runs: bool) -> None:
    """An honest run keeps passing its policy audit after the site has run again."""
    run = _written(tmp_path)
    this = [(DP["noise_multiplier"], DP["sample_rate"], DP["steps"] * 2)]
    runs = {"earlier": EARLIER, RUN_ID: this} | ({"later": LATER} if later_runs else {})
    _ledger(tmp_path, runs)
    counted = run_epsilon(2) + epsilon_of([gaussian_steps(*h) for h in EARLIER], DP["delta"], "rdp")
    config = _site_config(tmp_path, max_epsilon=round(counted * 1.02, 4))
    code, out, report = _audit(run, capsys, "--site-config", str(config))
    assert code == 0, out
    status = report["sites"][0]["policy_status"]
    assert status.startswith("respected") and "held before it" in status


def test_policy_still_counts_an_earlier_run(tmp_path: Path, capsys) -> None:
    run = _written(tmp_path)
    _ledger(tmp_path, {"earlier": LATER, RUN_ID: [(DP["noise_multiplier"], DP["sample_rate"], DP["steps"] * 2)]})
    config = _site_config(tmp_path, max_epsilon=round(run_epsilon(2) * 1.5, 4))
    code, out, _ = _audit(run, capsys, "--site-config", str(config))
    assert code == 1
    assert f"FAIL [policy] {config}: site-0: ε " in out and "the runs" in out and "> policy.max_epsilon" in out


def test_policy_says_when_earlier_runs_cannot_be_known(tmp_path: Path, capsys) -> None:
    """A ledger without this run (restored from an old backup, say) cannot tell which runs came first."""
    run = _written(tmp_path)
    _ledger(tmp_path, {"other": LATER})
    config = _site_config(tmp_path, max_epsilon=3.0)
    code, out, report = _audit(run, capsys, "--site-config", str(config))
    assert code == 0, out
    assert "cannot be counted" in report["sites"][0]["policy_status"]
    assert f"note: site-0: earlier runs not counted against policy.max_epsilon: {tmp_path}" in out


def test_unwritable_report_dir_is_exit_2_in_one_line(tmp_path: Path, capsys) -> None:
    run = _written(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder", encoding="utf-8")
    assert main(["audit", str(run), "--report-dir", str(blocker / "report")]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.err.startswith(f"fedtransfer: error: --report-dir {blocker / 'report'}: cannot write the audit")


def test_unreadable_run_dir_is_exit_2(tmp_path: Path, capsys) -> None:
    run = _written(tmp_path)
    run.chmod(0)
    try:
        if os.access(run, os.R_OK):
            pytest.skip("this user reads any folder (root): permissions cannot make one unreadable")
        assert main(["audit", str(run), "--report-dir", str(tmp_path / "report")]) == 2
        assert (
            capsys.readouterr().err == f"fedtransfer: error: {run}: cannot be read (permission denied); run the "
            "audit as a user who can read it\n"
        )
    finally:
        run.chmod(0o755)


def test_reports_hold_no_infinities() -> None:
    """JSON has no inf/nan: every report writer (audit, privacy.json, metrics) cleans through one function."""
    assert finite({"a": [float("inf"), (1.0, float("nan"))], "b": "x"}) == {"a": [None, [1.0, None]], "b": "x"}
