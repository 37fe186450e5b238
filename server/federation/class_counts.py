"""The DP class counts of round 0's statistics release, kept in the run folder for the global model's threshold.

Why a file: the counts arrive at round 0, the model is exported after the last round, and a resumed
coordinator (a new process) must export the same threshold. They are the server's post-processing of a DP
release it already received (no new release, nothing to account), and the threshold that follows from them
is chosen without touching the hold-out (common/model/threshold.py argues where a threshold may be chosen).
"""

from __future__ import annotations

import json
from pathlib import Path

from fedtransfer.common.config.finetune import threshold_rule
from fedtransfer.common.config.run import RunConfig
from fedtransfer.common.model.threshold import Threshold, global_threshold
from fedtransfer.common.storage import atomic

FILE = "class-counts.json"


def save_counts(run_dir: Path, counts: list[float]) -> None:
    """The release's noisy per-class counts, written atomically (round 0 only)."""
    atomic.write_text(run_dir / FILE, json.dumps({"noisy_class_counts": [float(c) for c in counts]}) + "\n")


def read_counts(run_dir: Path) -> list[float] | None:
    """The counts this run saved, or None (no statistics release, or an unreadable file)."""
    try:
        counts = json.loads((run_dir / FILE).read_text(encoding="utf-8"))["noisy_class_counts"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [float(c) for c in counts] if isinstance(counts, list) else None


def threshold_for(cfg: RunConfig, classes: int) -> Threshold | None:
    """The global model's threshold for a binary run (personal.threshold's rule), None for more classes."""
    if classes != 2:
        return None
    return global_threshold(threshold_rule(cfg.personal.threshold), read_counts(cfg.output_path))
