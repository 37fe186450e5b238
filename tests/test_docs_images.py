"""The demo's pictures in the manual show what `make demo` produces now (`make docs-images`, docs/refgen/images.py).

The pictures are drawn from a real run of configs/demo.yaml; docs/demo-run.json records that run's
config, its figures and each picture's SHA-256. These tests need no run (a demo takes minutes): they
fail when configs/demo.yaml changes without `make docs-images`, when a picture is replaced by hand, or
when a page quotes an accuracy or an ε the pictured run did not produce.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from fedtransfer.common.errors import InputError

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RECORD = json.loads((DOCS / "demo-run.json").read_text(encoding="utf-8"))
PLANS = json.loads((ROOT / "tests" / "fixtures" / "privacy_plans_622fd32.json").read_text(encoding="utf-8"))


@pytest.fixture
def images(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(DOCS))
    from refgen import images

    return images


def _accuracy() -> float:
    return RECORD["server_accuracy"]


def _epsilon() -> float:
    return max(RECORD["epsilon"].values())


def test_the_pictured_run_is_the_shipped_demo(images: Any) -> None:
    """Change configs/demo.yaml (rounds, ε, accountant, protocol, data...) and this fails until `make docs-images`."""
    assert RECORD["config"] == images.demo_config()
    config = RECORD["config"]
    assert RECORD["rounds"] == config["train.rounds"]
    assert RECORD["protocol"] == config["train.protocol"] and RECORD["accountant"] == config["privacy.accountant"]
    assert RECORD["target_epsilon"] == config["privacy.target_epsilon"]
    assert RECORD["delta"] == config["privacy.target_delta"]
    assert sorted(RECORD["epsilon"]) == [f"site-{i}" for i in range(config["data.num_sites"])]
    # round 0's statistics release aggregates too: rounds + 1 with feature statistics on
    assert RECORD["rounds_aggregated"] == config["train.rounds"] + int(config["privacy.feature_stats"])
    assert RECORD["audit"] == "passed"


def test_the_pictured_epsilon_is_the_one_the_pinned_plan_spends() -> None:
    """The run's ε is the accountant's for the demo's plan (tests/test_mechanisms.py pins it), not a rounding."""
    assert RECORD["epsilon"] == {site["site"]: site["epsilon"] for site in PLANS["demo.yaml"]}
    assert _epsilon() <= RECORD["target_epsilon"]


def test_the_pictures_in_docs_are_the_ones_the_run_drew() -> None:
    assert set(RECORD["images"]) == {"demo-accuracy.png", "demo-epsilon.png", "demo-audit-report.png"}
    for name, digest in RECORD["images"].items():
        data = (DOCS / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n"), name
        assert hashlib.sha256(data).hexdigest() == digest, f"docs/{name} was replaced: run `make docs-images`"


def test_the_pages_quote_the_pictured_runs_figures() -> None:
    """The README, the demo tutorial and the benchmarks page say what the pictures show."""
    accuracy, epsilon = _accuracy(), _epsilon()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"accuracy of **{accuracy:.3f}** with every site's ε spent **{epsilon:.3f}**" in readme
    assert f"{RECORD['rounds']} rounds of DP-FedSGD, accounted with {RECORD['accountant'].upper()}" in readme
    tutorial = (DOCS / "tutorials" / "demo.md").read_text(encoding="utf-8")
    last = f"round {RECORD['rounds']}/{RECORD['rounds']} | sites trained 4/4 | server acc {accuracy:.4f}"
    assert last in tutorial and f"ε spent max {epsilon:.3f}" in tutorial
    assert f"server hold-out accuracy {accuracy:.3f} [" in tutorial  # the outcome line, with its interval
    benchmarks = (DOCS / "benchmarks.md").read_text(encoding="utf-8")
    row = next(line for line in benchmarks.splitlines() if line.startswith("| demo accuracy, server hold-out |"))
    assert f"{accuracy:.3f}" in row and f"per-site ε {epsilon:.3f}" in row


def test_every_picture_is_shown_by_a_page() -> None:
    shown = " ".join(p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *DOCS.rglob("*.md")])
    for name in RECORD["images"]:
        assert re.search(rf"!\[[^\]]+\]\((\.\./|docs/)?{re.escape(name)}\)", shown), name


def _finished_run(folder: Path, config: dict[str, Any]) -> Path:
    """A run folder with the files images.summary() reads, as a completed run writes them."""
    nested: dict[str, Any] = {"output_dir": str(folder), "cache_dir": str(folder / "cache")}
    for key, value in config.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(nested), encoding="utf-8")
    status = {"status": "completed", "run_id": "abc", "rounds_aggregated": list(range(31))}
    status["final_metrics"] = {"accuracy": 0.5}
    (folder / "status.json").write_text(json.dumps(status), encoding="utf-8")
    sites = {"site-0": {"epsilon": 1.5}, "site-1": {"epsilon": 1.25}}
    (folder / "privacy.json").write_text(json.dumps({"sites": sites}), encoding="utf-8")
    for name in ("accuracy.png", "epsilon.png"):
        (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n" + name.encode())
    return folder


def test_the_figures_come_from_the_runs_own_files(images: Any, tmp_path: Path) -> None:
    record = images.summary(_finished_run(tmp_path / "run", images.demo_config()))
    assert record["server_accuracy"] == 0.5 and record["run_id"] == "abc"
    assert record["epsilon"] == {"site-0": 1.5, "site-1": 1.25}
    assert record["rounds_aggregated"] == 31 and record["config"] == images.demo_config()


def test_a_run_of_another_config_or_an_unfinished_run_is_refused(images: Any, tmp_path: Path) -> None:
    """Pictures of some other run must never be published as the demo's."""
    other = images.demo_config() | {"train.rounds": 5, "train.protocol": "fedavg"}
    with pytest.raises(InputError, match=r"config.json: not configs/demo.yaml's run \(train.protocol, train.rounds"):
        images.summary(_finished_run(tmp_path / "other", other))
    run = _finished_run(tmp_path / "failed", images.demo_config())
    (run / "status.json").write_text(json.dumps({"status": "failed"}), encoding="utf-8")
    with pytest.raises(InputError, match="'failed', not completed"):
        images.summary(run)
    (run / "privacy.json").unlink()
    with pytest.raises(InputError, match=r"no privacy\.json"):
        images.summary(run)


def test_publishing_writes_the_pictures_and_their_hashes(images: Any, tmp_path: Path) -> None:
    run = _finished_run(tmp_path / "run", images.demo_config())
    shot = tmp_path / "shot.png"
    shutil.copyfile(DOCS / "demo-audit-report.png", shot)
    docs = tmp_path / "docs"
    images.publish(run, shot, {"run_id": "abc"}, docs)
    record = json.loads((docs / "demo-run.json").read_text(encoding="utf-8"))
    assert record["run_id"] == "abc"
    assert (docs / "demo-accuracy.png").read_bytes() == (run / "accuracy.png").read_bytes()
    for name, digest in record["images"].items():
        assert hashlib.sha256((docs / name).read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in docs.iterdir()) == sorted([*record["images"], "demo-run.json"])
