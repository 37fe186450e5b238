"""Reading a run's evidence: the hash-chained logs, privacy.json, config.json, status.json, model.pt.

What cannot be read is a failure of the check that needed it, never an exception: the
audit goes on with what is there and the report says what was missing.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fedtransfer.common.config.run import ConfigError, config_from_dict
from fedtransfer.common.storage.audit_log import AuditLogError, read_records, update_digest, verify_chain
from fedtransfer.common.wire.protocol import TRAININGS, Event
from fedtransfer.server.audit.findings import SERVER_LOG, Entry, Evidence, Findings, Malformed, Update

RUN_FILES = (
    "privacy.json",
    "config.json",
    "status.json",
    "model.pt",
    "model.onnx",
    "model.torchscript.pt",
)  # hashed into the report (the last two: `fedtransfer export`)


def check_chain(path: Path, found: Findings) -> None:
    """Every defect of one log's hash chain, one failure per line at fault."""
    if not path.is_file():
        found.fail("chains", path, None, "audit log is missing")
        return
    for problem in verify_chain(path):
        found.fail("chains", path, problem.line, problem.reason)


def read_entries(path: Path) -> list[Entry]:
    """All records with their line numbers; none when the file cannot be parsed (a chain failure already)."""
    try:
        return [Entry(path, number, record) for number, record in enumerate(read_records(path), start=1)]
    except (AuditLogError, OSError):
        return []


def read_json(path: Path, check: str, found: Findings) -> dict[str, Any] | None:
    """A JSON object from disk, or None with a failure of `check` saying why not."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        data = None
        found.fail(check, path, None, "missing")
    except (OSError, ValueError) as err:
        data = None
        found.fail(check, path, None, f"unreadable ({err})")
    if data is not None and not isinstance(data, dict):
        data = None
        found.fail(check, path, None, "not a JSON object")
    return data


def gather(run_dir: Path, site_logs: Sequence[Path], found: Findings) -> Evidence:
    """Read the run's files and logs, keeping only records of the audited run (privacy.json's run id)."""
    logs = list(site_logs) or sorted(run_dir.glob("sites/*/audit.jsonl"))
    ev = Evidence(run_dir, run_dir / SERVER_LOG, logs, simulation=(run_dir / "sites").is_dir())
    privacy = read_json(ev.privacy_path, "privacy", found)
    ev.status = read_json(ev.status_path, "completion", found)
    raw_cfg = read_json(ev.config_path, "privacy", found)  # JSON, not YAML: PyYAML reads 1e-05 as text
    try:
        ev.cfg = config_from_dict(raw_cfg) if raw_cfg is not None else None
    except ConfigError as err:
        found.fail("privacy", ev.config_path, None, str(err))
    server = read_entries(ev.server_log)
    if privacy is not None:
        ev.run_id = privacy.get("run_id")
        ev.privacy = privacy["sites"] if isinstance(privacy.get("sites"), dict) else {}
    elif starts := [e for e in server if e.event == Event.RUN_STARTED]:
        ev.run_id = starts[-1].record.get("run_id")
    ev.server = [e for e in server if e.record.get("run_id") == ev.run_id]
    if not logs:
        found.notes.append("no site logs: pass --site-log FILE for each site")
    for path in logs:
        _add_site_log(ev, path, found)
    return ev


def _add_site_log(ev: Evidence, path: Path, found: Findings) -> None:
    """One site's log, keyed by the site it names; a log naming several sites, or a second log, fails."""
    entries = [e for e in read_entries(path) if e.record.get("run_id") == ev.run_id]
    names = sorted({str(e.record.get("site")) for e in entries})
    if not entries:
        found.notes.append(f"{path}: no records of run {ev.run_id}")
    elif len(names) > 1:
        found.fail_at("updates", entries[0], f"one log names several sites {names}")
    elif names[0] in ev.sites:
        found.fail("updates", path, None, f"a second log for {names[0]} (first: {ev.site_log_of[names[0]]})")
    else:
        ev.sites[names[0]], ev.site_log_of[names[0]] = entries, path


def field_of(entry: Entry, key: str, kind: type) -> Any:
    """A record's field of the given type (never a bool posing as a number); Malformed otherwise."""
    value = entry.record.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise Malformed(entry, f"{entry.event} record lacks a valid {key!r}")
    return value


def parse_update(entry: Entry) -> Update:
    """Validate an update record's fields; Malformed names what is missing."""
    digest = field_of(entry, "update", dict)
    tensors = digest.get("tensors")
    if not isinstance(digest.get("sha256"), str) or not isinstance(tensors, list):
        raise Malformed(entry, f"{entry.event} record has no valid update digest (sha256, tensors)")
    if not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tensors):
        raise Malformed(entry, f"{entry.event} record lists a tensor without a name")
    dp = entry.record.get("dp")
    if entry.event in TRAININGS and ("dp" not in entry.record or not isinstance(dp, dict | None)):
        raise Malformed(entry, f"{entry.event} record lacks 'dp' (the round's DP parameters, or null without DP)")
    names = tuple(t["name"] for t in tensors)
    return Update(entry, field_of(entry, "site", str), field_of(entry, "round", int), digest["sha256"], names, dp)


def collect_updates(entries: Iterable[Entry], event: Event, found: Findings) -> list[Update]:
    """Every record of `event` parsed as an update; a malformed one is an `updates` failure."""
    updates = []
    for entry in entries:
        if entry.event == event:
            try:
                updates.append(parse_update(entry))
            except Malformed as err:
                found.fail_at("updates", err.entry, str(err))
    return updates


def file_hashes(files: Iterable[Path], run_dir: Path) -> dict[str, str]:
    """SHA-256 of every file audited (logs, site configs and the run's own files) that exists."""
    every = [*files, *(run_dir / name for name in RUN_FILES)]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in every if p.is_file()}


def model_head_digest(path: Path) -> str | None:
    """SHA-256 (update_digest) of the head inside an exported model file, named as on the wire."""
    import torch  # late import: torch is heavy and only this check needs it here
    from fedtransfer.common.wire.exchange import PREFIX

    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        state = {PREFIX + name: tensor.numpy() for name, tensor in raw["head_state"].items()}
    except (OSError, RuntimeError, KeyError, TypeError, AttributeError, EOFError, ValueError, pickle.UnpicklingError):
        return None  # whatever it is, it is not the model the run exported
    return update_digest(state)["sha256"]
