"""Checkpoints after every round, written atomically, so a crashed coordinator resumes.

A checkpoint holds everything the next round depends on: the global head, the
strategy's own state (FedAdam's moments), the run id the sites key their ledgers by,
and the per-site privacy record so far.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fedtransfer.common.storage import atomic


@dataclass
class Checkpoint:
    run_id: str
    server_round: int
    head: dict[str, np.ndarray]
    strategy_state: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    sites: dict[str, Any] = field(default_factory=dict)  # per-site privacy record, see server/federation/report.py


def path_for(run_dir: Path, server_round: int) -> Path:
    return run_dir / "checkpoints" / f"round-{server_round:04d}.pt"


def save(run_dir: Path, ckpt: Checkpoint) -> Path:
    path = path_for(run_dir, ckpt.server_round)
    payload = {
        "format": "fedtransfer-checkpoint/1",
        "run_id": ckpt.run_id,
        "server_round": ckpt.server_round,
        "head": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ckpt.head.items()},
        "strategy_state": {
            name: {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
            for name, arrays in ckpt.strategy_state.items()
        },
        "sites": ckpt.sites,
    }
    atomic.torch_save(payload, path)
    return path


def latest(run_dir: Path) -> Checkpoint | None:
    """The newest readable checkpoint; a torn file (crash mid-write of an older tool) is skipped."""
    for path in sorted((run_dir / "checkpoints").glob("round-*.pt"), reverse=True):
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError):
            continue
        if raw.get("format") != "fedtransfer-checkpoint/1":
            continue
        return Checkpoint(
            run_id=raw["run_id"],
            server_round=int(raw["server_round"]),
            head={k: v.numpy() for k, v in raw["head"].items()},
            strategy_state={n: {k: v.numpy() for k, v in a.items()} for n, a in raw["strategy_state"].items()},
            sites=raw["sites"],
        )
    return None
