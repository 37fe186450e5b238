"""A coordinator killed mid-run resumes from its last checkpoint and ends with the uninterrupted run's model.

The coordinator dies after the sites sent their round-2 updates but before it checkpointed round 2:
the ServerApp and each site's real ClientApp answer in this process (tests/inprocess_grid.py), and
the Grid raises, as a SIGKILLed SuperLink ends the ServerApp, when the round-2 updates come back.
The resumed run (a new Grid, new site processes: an empty site cache) sends round 2 again; the
sites answer it from their reply caches on disk, so their ledgers charge round 2 once, and the
final head equals the one an uninterrupted run produces. What is under test is the checkpoint,
the reply cache and the ledgers, not Flower's processes; a whole run on them is
tests/test_simulation.py's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fedtransfer.common.config.run import RunConfig, config_from_dict
from fedtransfer.common.storage.audit_log import read_records
from fedtransfer.server.federation import checkpoint
from flwr.app import Message
from flwr.app.message_type import MessageType

from tests.inprocess_grid import InProcessGrid, run_in_process

SMALL = {
    "run_name": "resume",
    "seed": 7,
    "device": "cpu",
    "backbone": {"image_size": 32},
    "data": {"source": "digits", "split": "iid", "num_sites": 2, "max_samples": 600},
    "train": {"rounds": 2, "local_epochs": 2, "protocol": "fedavg", "learning_rate": 0.5},
    "privacy": {"target_epsilon": 3.0, "target_delta": 1.0e-4, "feature_stats": False, "accountant": "rdp"},
}
SITES = ("site-0", "site-1")


class CoordinatorKilled(BaseException):
    """The ServerApp's end when its SuperLink is killed: nothing in it may catch this."""


class KilledAfterRound2Updates(InProcessGrid):
    """Sites answer as usual; the coordinator dies when their round-2 updates are pulled, before its checkpoint."""

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        replies = super().pull_messages(message_ids)
        trains = sum(m.metadata.message_type == MessageType.TRAIN for m in self.pushed)
        # round 0's record-count release, then rounds 1 and 2: the third train message per site
        if trains == 3 * len(SITES) and self.pushed[-1].metadata.message_type == MessageType.TRAIN:
            raise CoordinatorKilled
        return replies


def _config(tmp_path: Path, name: str) -> RunConfig:
    return config_from_dict(SMALL | {"output_dir": str(tmp_path / name), "cache_dir": str(tmp_path / "cache")})


def _events(run_dir: Path, site: str, event: str) -> list[dict[str, Any]]:
    log = run_dir / "sites" / site / "audit.jsonl"
    return [r for r in read_records(log) if r["event"] == event] if log.exists() else []


def _final_head(run_dir: Path) -> dict[str, np.ndarray]:
    ckpt = checkpoint.latest(run_dir)
    assert ckpt is not None
    return ckpt.head


@pytest.mark.usefixtures("app_process_umask")
def test_killed_coordinator_resumes_to_the_uninterrupted_model(tmp_path: Path) -> None:
    reference = run_in_process(_config(tmp_path, "reference"))
    assert reference["status"] == "completed"

    cfg = _config(tmp_path, "crashed")
    run_dir = cfg.output_path
    with pytest.raises(CoordinatorKilled):
        run_in_process(cfg, KilledAfterRound2Updates.for_simulation(cfg))
    assert all(any(e["round"] == 2 for e in _events(run_dir, s, "update-sent")) for s in SITES)
    assert checkpoint.latest(run_dir).server_round == 1, "the kill came after the round-2 checkpoint"
    assert not (run_dir / "status.json").exists()

    status = run_in_process(replace(cfg, resume=True))
    assert status["status"] == "completed"

    # resumed from round 1, not from round 0: the run id is kept and round 1 is not sent again
    assert status["run_id"] == checkpoint.latest(run_dir).run_id
    server_log = read_records(run_dir / "audit.jsonl")
    assert [r["round"] for r in server_log if r["event"] == "run-resumed"] == [2]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1, 2]
    for site in SITES:
        # round 2 was answered from the site's cache: trained once, charged once, replayed once
        assert [e["round"] for e in _events(run_dir, site, "update-sent")] == [0, 1, 2]
        (replayed,) = _events(run_dir, site, "reply-replayed")
        assert replayed["round"] == 2
        assert replayed["update"] == _events(run_dir, site, "update-sent")[2]["update"]
        ledger = json.loads((run_dir / "sites" / site / "privacy-ledger.json").read_text())
        (entry,) = ledger["runs"].values()
        assert [r["round"] for r in entry["rounds"]] == [0, 1, 2]
        # model 1 was scored in round 2's (replayed) training reply, model 2 in the final exchange: each once
        assert [r["round"] for r in entry["evaluation"]["rounds"]] == [1, 2]
    # the one-behind metrics survive the resume: the same federated figures as the uninterrupted run's
    reference_metrics = [
        json.loads(line) for line in (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()
    ]
    assert all(m["federated"] for m in metrics if m["round"] > 0)  # round 0 released counts: no model to score
    assert [m["federated"] for m in metrics] == [m["federated"] for m in reference_metrics]

    expected, got = _final_head(tmp_path / "reference"), _final_head(run_dir)
    assert expected.keys() == got.keys()
    for name in expected:
        assert np.allclose(got[name], expected[name], rtol=1e-5, atol=1e-7), name
    ours = json.loads((run_dir / "privacy.json").read_text())["sites"]
    theirs = json.loads((tmp_path / "reference" / "privacy.json").read_text())["sites"]
    assert {s: ours[s]["epsilon"] for s in SITES} == pytest.approx({s: theirs[s]["epsilon"] for s in SITES})


class KilledInFinalEvaluation(InProcessGrid):
    """The coordinator dies when the final evaluation's replies are pulled: after every round's checkpoint."""

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        replies = super().pull_messages(message_ids)
        if self.pushed and self.pushed[-1].metadata.message_type == MessageType.EVALUATE:
            raise CoordinatorKilled
        return replies


@pytest.mark.usefixtures("app_process_umask")
def test_a_run_killed_in_its_final_evaluation_resumes_without_charging_it_twice(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "crashed")
    run_dir = cfg.output_path
    with pytest.raises(CoordinatorKilled):
        run_in_process(cfg, KilledInFinalEvaluation.for_simulation(cfg))
    assert checkpoint.latest(run_dir).server_round == 2 and not (run_dir / "status.json").exists()
    status = run_in_process(replace(cfg, resume=True))
    assert status["status"] == "completed" and 0 < status["final_accuracy"] <= 1
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1, 2] and metrics[-1]["federated"]["sites"] == len(SITES)
    privacy = json.loads((run_dir / "privacy.json").read_text())["sites"]
    for site in SITES:
        (replayed,) = _events(run_dir, site, "reply-replayed")  # the final evaluation, answered from its cache
        assert replayed["round"] == 2 and replayed["release"] == "evaluation"
        ledger = json.loads((run_dir / "sites" / site / "privacy-ledger.json").read_text())
        (entry,) = ledger["runs"].values()
        assert [r["round"] for r in entry["evaluation"]["rounds"]] == [1, 2]
        assert [r["round"] for r in privacy[site]["evaluation"]["rounds"]] == [1, 2]
