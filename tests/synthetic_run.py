"""A run folder written record by record, as the server and its sites write it, in milliseconds.

The audit only reads files, so its checks can be tested without starting Flower: this
writes the server's and every site's hash-chained log with the real `AuditLog`, ε claims
computed with the real accountant (`fedtransfer.common.privacy.calibration.epsilon_of`), privacy.json,
config.json, status.json and a model.pt whose head is the last aggregate. Arguments say
which sites trained in which round, so a test can write an honest run or a broken one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fedtransfer.common.config.run import config_from_dict, to_nested
from fedtransfer.common.privacy.calibration import epsilon_of, stats_noise_multiplier
from fedtransfer.common.privacy.events import gaussian_steps
from fedtransfer.common.privacy.fedsgd import STATS_COUNTS
from fedtransfer.common.storage.audit_log import AuditLog, update_digest
from fedtransfer.common.wire.protocol import RECORD_COUNTS, Event

HEAD = ("head.1.bias", "head.1.weight")
# fedavg, 2 local epochs at batch 64: a site that released COUNT records samples at 1/⌈600/64⌉ = 0.1, 10 steps an
# epoch (plan_dp), so every size it sends follows from its round-0 release (common/privacy/coverage.py `follows`)
DP = {"noise_multiplier": 2.0, "sample_rate": 0.1, "steps": 20, "clip_norm": 1.0, "delta": 1e-5, "accountant": "rdp"}
COUNT = 600.4  # each site's released (noisy) record count
RELEASE_DP = DP | {"noise_multiplier": stats_noise_multiplier(3.0, DP["delta"], 0.02, "rdp"), "sample_rate": 1.0}
RELEASE_DP |= {"steps": 1}
RUN_ID = "synthetic-run"


@dataclass
class RunSpec:
    """What happened: the sites, and which of them trained (and were aggregated) in each round."""

    sites: tuple[str, ...] = ("site-0", "site-1")
    rounds: int = 2
    min_sites: int = 2
    trained: dict[int, list[str]] | None = None  # round -> sites; None: every site every round
    status: dict[str, Any] = field(default_factory=lambda: {"status": "completed"})

    def trained_in(self, rnd: int) -> list[str]:
        """Round 0 (the record-count release): every site, unless `trained` is empty (nothing reached the server)."""
        if rnd == 0 and self.trained is not None:
            return self.trained.get(0, list(self.sites) if self.trained else [])
        return list(self.sites) if self.trained is None else self.trained.get(rnd, [])


def write_run(run_dir: Path, spec: RunSpec) -> Path:
    """Write the run folder (simulation layout: site logs under sites/<name>/) and return it."""
    run_dir.mkdir(parents=True)
    cfg = config_from_dict(
        {
            "train": {
                "rounds": spec.rounds,
                "min_sites": spec.min_sites,
                "protocol": "fedavg",
                "local_epochs": 2,
                "batch_size": 64,
            },
            "data": {"num_sites": len(spec.sites)},
            "privacy": {"target_epsilon": 3.0, "target_delta": DP["delta"], "feature_stats": False},
        }
    )
    (run_dir / "config.json").write_text(json.dumps(to_nested(cfg)), encoding="utf-8")
    server = AuditLog(run_dir / "audit.jsonl")
    server.append(Event.RUN_STARTED, run_id=RUN_ID, round=1, head=list(HEAD))
    rng = np.random.default_rng(0)
    head = _head(rng)
    claims: dict[str, list[dict[str, Any]]] = {name: [] for name in spec.sites}
    released = set(spec.trained_in(0))
    for rnd in range(0 if released else 1, spec.rounds + 1):
        updates = []
        for name in spec.trained_in(rnd):
            update = _head(rng) if rnd else {STATS_COUNTS: rng.standard_normal(3).astype(np.float32)}
            digest = update_digest(update)
            dp = DP if rnd else RELEASE_DP
            epsilon = epsilon_of(_history(len(claims[name]) + 1), DP["delta"], DP["accountant"])
            sent = {  # every value of the reply, as a site logs it (common/privacy/coverage.py)
                "tensors": {"arrays": digest["sha256"]},
                "metrics": {"num-examples": COUNT, "steps": dp["steps"], "epsilon": epsilon},
                "configs": {"site": ["name"], "dp": sorted(dp)},
            }
            release = {} if rnd else {"release": RECORD_COUNTS, "released_count": COUNT}
            _site_log(run_dir, name).append(
                Event.UPDATE_SENT, run_id=RUN_ID, site=name, round=rnd, update=digest, dp=dp, sent=sent, **release
            )
            server.append(Event.UPDATE_RECEIVED, run_id=RUN_ID, site=name, round=rnd, update=digest)
            claims[name].append({"round": rnd, "status": "trained", "epsilon": epsilon} | _per_round(dp))
            if rnd:
                updates.append(update)
        if rnd and len(updates) >= spec.min_sites:
            head = {k: np.mean([u[k] for u in updates], axis=0).astype(np.float32) for k in HEAD}
        server.append(
            Event.ROUND_AGGREGATED,
            run_id=RUN_ID,
            round=rnd,
            sites=sorted(spec.trained_in(rnd)),
            aggregate=update_digest(head),
        )
    _write_privacy(run_dir, claims)
    torch.save(
        {"head_state": {k.removeprefix("head."): torch.from_numpy(v) for k, v in head.items()}}, run_dir / "model.pt"
    )
    server.append(Event.MODEL_EXPORTED, run_id=RUN_ID, round=spec.rounds, head=update_digest(head))
    (run_dir / "status.json").write_text(json.dumps(spec.status | {"run_id": RUN_ID}), encoding="utf-8")
    return run_dir


def _head(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "head.1.bias": rng.standard_normal(3).astype(np.float32),
        "head.1.weight": rng.standard_normal((3, 4)).astype(np.float32),
    }


def _per_round(dp: dict[str, Any]) -> dict[str, Any]:
    return {k: dp[k] for k in ("noise_multiplier", "sample_rate", "steps", "clip_norm")} | {"num_examples": COUNT}


def _history(entries: int) -> list:
    """The accountant history after a site's first `entries` claims: round 0's release, then training rounds."""
    release = gaussian_steps(RELEASE_DP["noise_multiplier"], 1.0, 1)
    return [release, *[gaussian_steps(DP["noise_multiplier"], DP["sample_rate"], DP["steps"])] * (entries - 1)]


def _site_log(run_dir: Path, name: str) -> AuditLog:
    folder = run_dir / "sites" / name
    folder.mkdir(parents=True, exist_ok=True)
    return AuditLog(folder / "audit.jsonl")


def _write_privacy(run_dir: Path, claims: dict[str, list[dict[str, Any]]]) -> None:
    sites = {}
    for name, rounds in claims.items():
        spent = rounds[-1]["epsilon"] if rounds else 0.0
        sites[name] = {
            "epsilon": spent,
            "delta": DP["delta"] if rounds else None,
            "accountant": DP["accountant"],
            "per_round": rounds,
        }
    (run_dir / "privacy.json").write_text(json.dumps({"run_id": RUN_ID, "sites": sites}), encoding="utf-8")


def run_epsilon(rounds: int) -> float:
    """ε a site claims after its round-0 release and `rounds` training rounds of this run."""
    return epsilon_of(_history(rounds + 1), DP["delta"], "rdp")
