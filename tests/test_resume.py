"""A coordinator killed mid-run resumes from its last checkpoint and ends with the uninterrupted run's model.

Real processes on Flower's Simulation Engine: the SuperLink's whole process tree is SIGKILLed
after the sites sent their round-2 updates but before the coordinator checkpointed round 2.
The resumed run sends round 2 again; the sites answer it from their reply caches, so their
ledgers charge round 2 once, and the final head equals the one an uninterrupted run produces.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fedtransfer.common.config.run import RunConfig, config_from_dict
from fedtransfer.common.storage.audit_log import read_records
from fedtransfer.server.federation import checkpoint
from fedtransfer.server.launch.simulation import SimulationError, simulate

from tests.deploy_harness import _descendants

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


def _config(tmp_path: Path, name: str) -> RunConfig:
    return config_from_dict(SMALL | {"output_dir": str(tmp_path / name), "cache_dir": str(tmp_path / "cache")})


def _events(run_dir: Path, site: str, event: str) -> list[dict[str, Any]]:
    log = run_dir / "sites" / site / "audit.jsonl"
    return [r for r in read_records(log) if r["event"] == event] if log.exists() else []


def _superlink_pid(flwr_home: Path) -> int | None:
    """The simulation SuperLink that `simulate` started for this run folder (FLWR_HOME is per run)."""
    marker = f"FLWR_HOME={flwr_home}".encode()
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if any(arg.endswith(b"flower-superlink") for arg in cmdline) and marker in environ:
            return int(entry.name)
    return None


def _crash(pid: int) -> None:
    """SIGKILL the SuperLink's process group and every descendant (SuperExec, ServerApp, Ray)."""
    strays = _descendants(pid)
    os.killpg(pid, signal.SIGKILL)
    for child in strays:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def _final_head(run_dir: Path) -> dict[str, np.ndarray]:
    ckpt = checkpoint.latest(run_dir)
    assert ckpt is not None
    return ckpt.head


def test_killed_coordinator_resumes_to_the_uninterrupted_model(tmp_path: Path) -> None:
    reference = simulate(_config(tmp_path, "reference"), stream=False)
    assert reference["status"] == "completed"

    cfg = _config(tmp_path, "crashed")
    run_dir = cfg.output_path
    failure: list[BaseException] = []

    def run() -> None:
        try:
            simulate(cfg, stream=False)
        except SimulationError as err:  # the crash we cause below
            failure.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 400
    while not all(any(e["round"] == 2 for e in _events(run_dir, s, "update-sent")) for s in SITES):
        assert thread.is_alive() and time.monotonic() < deadline, "the run ended before both sites sent round 2"
        time.sleep(0.05)
    pid = _superlink_pid(run_dir / ".flwr")
    assert pid is not None
    _crash(pid)
    thread.join(timeout=120)
    assert not thread.is_alive() and failure, "simulate() should report the killed run"
    assert checkpoint.latest(run_dir).server_round == 1, "the kill came after the round-2 checkpoint"
    assert not (run_dir / "status.json").exists()

    status = simulate(replace(cfg, resume=True), stream=False)
    assert status["status"] == "completed"

    # resumed from round 1, not from round 0: the run id is kept and round 1 is not sent again
    assert status["run_id"] == checkpoint.latest(run_dir).run_id
    server_log = read_records(run_dir / "audit.jsonl")
    assert [r["round"] for r in server_log if r["event"] == "run-resumed"] == [2]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2]
    for site in SITES:
        # round 2 was answered from the site's cache: trained once, charged once, replayed once
        assert [e["round"] for e in _events(run_dir, site, "update-sent")] == [1, 2]
        (replayed,) = _events(run_dir, site, "reply-replayed")
        assert replayed["round"] == 2
        assert replayed["update"] == _events(run_dir, site, "update-sent")[1]["update"]
        ledger = json.loads((run_dir / "sites" / site / "privacy-ledger.json").read_text())
        (entry,) = ledger["runs"].values()
        assert [r["round"] for r in entry["rounds"]] == [1, 2]

    expected, got = _final_head(tmp_path / "reference"), _final_head(run_dir)
    assert expected.keys() == got.keys()
    for name in expected:
        assert np.allclose(got[name], expected[name], rtol=1e-5, atol=1e-7), name
    ours = json.loads((run_dir / "privacy.json").read_text())["sites"]
    theirs = json.loads((tmp_path / "reference" / "privacy.json").read_text())["sites"]
    assert {s: ours[s]["epsilon"] for s in SITES} == pytest.approx({s: theirs[s]["epsilon"] for s in SITES})
