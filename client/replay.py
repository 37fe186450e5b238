"""A site's cache of its last training reply per run, so a re-sent round is answered without training.

A coordinator that crashes after the sites trained round r resumes from its round r-1
checkpoint and sends round r again: same run id, same round, same global head. Training
again would charge the site's privacy ledger twice for one release (and the budget check
would decline the round). The reply the site already sent is a function of exactly that
request, so the site answers with the same bytes: nothing new is released, no ε is spent.

Only the newest reply per run is kept: a resumed coordinator only ever repeats the round
that was in flight when it stopped. Files are written atomically on the site's own disk.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from fedtransfer.common.storage import atomic
from fedtransfer.common.storage.audit_log import update_digest
from fedtransfer.common.wire.exchange import arrays_to_numpy
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

FORMAT = "fedtransfer-reply/1"
RUN_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # a run id names a file here: no path, no empty name


def request_key(arrays: ArrayRecord, config: ConfigRecord) -> str:
    """SHA-256 over the request: its config record (run id, round, fingerprint, ...) and head tensors."""
    h = hashlib.sha256(b"fedtransfer-request-v1\n")
    h.update(repr(sorted(config.items())).encode())
    h.update(update_digest(arrays_to_numpy(arrays))["sha256"].encode())
    return h.hexdigest()


class ReplyCache:
    """`<state_dir>/replies/<run-id>.pt`: the request key and the reply sent for it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, run_id: str) -> Path:
        if not RUN_ID.fullmatch(run_id):
            raise ValueError(f"run-id {run_id!r} is not 1-64 letters, digits, '-', '_' or '.'")
        return self.folder / f"{run_id}.pt"

    def load(self, run_id: str, key: str) -> RecordDict | None:
        """The reply stored for exactly this request, or None (no file, another request, unreadable)."""
        path = self._path(run_id)
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except (FileNotFoundError, RuntimeError, EOFError, OSError, pickle.UnpicklingError):
            return None  # absent, torn or foreign: answered by training, never trusted
        if not isinstance(raw, dict) or raw.get("format") != FORMAT or raw.get("key") != key:
            return None
        return RecordDict(
            {name: ArrayRecord(dict(tensors)) for name, tensors in raw["arrays"].items()}
            | {name: MetricRecord(dict(values)) for name, values in raw["metrics"].items()}
            | {name: ConfigRecord(dict(values)) for name, values in raw["configs"].items()}
        )

    def save(self, run_id: str, key: str, reply: RecordDict) -> None:
        """Plain str keys and values only: `torch.load(weights_only=True)` refuses any other class, enums too."""
        payload = {
            "format": FORMAT,
            "key": key,
            "arrays": {
                str(name): {str(k): torch.from_numpy(v.copy()) for k, v in arrays_to_numpy(rec).items()}
                for name, rec in reply.array_records.items()
            },
            "metrics": {str(name): _plain(rec) for name, rec in reply.metric_records.items()},
            "configs": {str(name): _plain(rec) for name, rec in reply.config_records.items()},
        }
        atomic.torch_save(payload, self._path(run_id))


def _plain(record: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k): str(v) if isinstance(v, str) else v for k, v in record.items()}
