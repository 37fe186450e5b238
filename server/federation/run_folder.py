"""A run's output folder: resumed only with the configuration the run was started with.

Checked before anything is written, so a refused resume leaves the completed or
interrupted run exactly as it was: its status, config, checkpoints and audit log.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedtransfer.common.config.run import ConfigError, RunConfig, to_run_config
from flwr.common.config import flatten_dict

CONFIG = "config.json"
STATUS = "status.json"
# Keys a resumed run may change: where and how fast it runs, never what it computes or promises.
RESUMABLE = frozenset({"resume", "device", "cache_dir", "train.round_timeout_s"})


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: unreadable ({type(err).__name__}); restore it or start a new output_dir") from None
    return raw if isinstance(raw, dict) else None


def changed_keys(cfg: RunConfig, run_dir: Path) -> list[str]:
    """Keys whose value differs from the run's own config.json (none when there is no config.json)."""
    stored = _read_json(run_dir / CONFIG)
    if stored is None:
        return []
    before, now = flatten_dict(stored), to_run_config(cfg)
    return sorted(k for k in before.keys() | now.keys() if k not in RESUMABLE and before.get(k) != now.get(k))


def completed(run_dir: Path) -> dict[str, Any] | None:
    """The status of a run that completed in this folder, else None."""
    status = _read_json(run_dir / STATUS)
    return status if status is not None and status.get("status") == "completed" else None


def check_resume(cfg: RunConfig) -> dict[str, Any] | None:
    """Before a resume writes anything: refuse a changed config; a completed run's status means nothing to do."""
    run_dir = cfg.output_path
    if changed := changed_keys(cfg, run_dir):
        stored = flatten_dict(_read_json(run_dir / CONFIG) or {})
        now = to_run_config(cfg)
        diffs = ", ".join(f"{k} ({str(stored.get(k))[:40]!r} -> {str(now.get(k))[:40]!r})" for k in changed[:5])
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        raise ConfigError(
            f"{run_dir}: cannot resume with a changed config: {diffs}{more}; resume with the run's own "
            f"{run_dir / CONFIG} or start a new output_dir"
        )
    return completed(run_dir)
