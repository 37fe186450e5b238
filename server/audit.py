"""`fedtransfer audit RUN_DIR`: check the evidence a run left behind and write a report to sign.

The evidence: the server's hash-chained log (RUN_DIR/audit.jsonl), every site's own log,
privacy.json, config.json, status.json and model.pt. Each check below lists every
failure with the file, the line when there is one, and the reason; any failure fails
the audit (exit status 1), so the command can gate a release.

- chains: every log is an intact hash chain (no line edited, deleted, inserted or moved);
- updates: every update the server received was logged as sent by that site with the
  same SHA-256, and each round aggregated exactly the updates the server received;
- head-only: every update sent or received holds exactly the head's tensor names, as the
  server recorded them when the run started;
- completion: a completed run aggregated every round and model.pt holds the head the
  log says was exported;
- privacy: per site, ε recomputed with Opacus from the per-round DP parameters the site
  logged equals the ε it claimed, and is within the run's target; privacy.json agrees
  with the logs;
- policy: each site's own limits (its site config) were respected;
- empirical (with --empirical): the canary test's ε lower bound does not exceed the ε
  the accountant claims (server/empirical_audit.py).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import io
import json
import math
import pickle
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.audit_log import AuditLogError, read_records, update_digest, verify_chain
from common.config import ConfigError, RunConfig, SiteConfig, config_from_dict, load_site_config
from common.exchange import MASKED_WEIGHT

if TYPE_CHECKING:
    from server.empirical_audit import CanarySettings, EmpiricalResult

SERVER_LOG = "audit.jsonl"
REPORT_NAME = "audit-report"
EPS_RTOL = 1e-6  # the same history through the same Opacus accountant agrees to float noise
TRAININGS = ("update-sent", "update-trained")  # site-log records of a training: plain, or before SecAgg+ masking
DP_KEYS = ("noise_multiplier", "sample_rate", "steps", "clip_norm")  # logged by the site, reported to the server
CHECKS = {
    "chains": "audit logs are intact hash chains",
    "updates": "every update the server used was sent by that site, with the same hash",
    "head-only": "only head tensors left a site (under secure aggregation: masked, plus the masked weight)",
    "secure-aggregation": "the run's mode held throughout: masked vectors only when secure_aggregation is on",
    "completion": "every round aggregated; model.pt is the exported head",
    "privacy": "ε recomputed from the DP parameters equals each site's claim and is within target",
    "policy": "each site's own policy was respected",
    "empirical": "empirical ε lower bound does not exceed the claimed ε",
}


@dataclass(frozen=True)
class Failure:
    """One failed check, pointing at the evidence."""

    check: str
    file: str
    line: int | None
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}" if self.line is not None else f"{self.file}: {self.reason}"


@dataclass(frozen=True)
class Entry:
    """An audit-log record and where it is, so that every finding can name file and line."""

    path: Path
    line: int
    record: dict[str, Any]

    @property
    def event(self) -> str:
        return self.record["event"]


class Malformed(ValueError):
    """A record that verifies as a chain link but lacks a field the audit needs."""

    def __init__(self, entry: Entry, reason: str) -> None:
        super().__init__(reason)
        self.entry = entry


@dataclass(frozen=True)
class Update:
    """An update-sent (site log) or update-received (server log) record, checked for shape."""

    entry: Entry
    site: str
    round: int
    sha256: str
    tensors: tuple[str, ...]
    dp: dict[str, Any] | None  # site side: the round's DP parameters; None when trained without DP


@dataclass
class RoundDP:
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    epsilon_claimed: float | None
    epsilon_recomputed: float


@dataclass
class SiteAudit:
    """Everything the report says about one site."""

    name: str
    log: str | None
    updates_matched: int = 0
    epsilon_claimed: float | None = None
    epsilon_recomputed: float | None = None
    target_epsilon: float | None = None
    delta: float | None = None
    accountant: str | None = None
    rounds: list[RoundDP] = field(default_factory=list)
    rounds_joined: list[int] = field(default_factory=list)
    rounds_declined: list[dict[str, Any]] = field(default_factory=list)
    policy: dict[str, Any] | None = None
    policy_status: str = ""
    empirical: EmpiricalResult | None = None
    control: EmpiricalResult | None = None  # the positive control: the same training without DP


@dataclass
class Findings:
    """Failures and notes, collected by every check in turn."""

    failures: list[Failure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def fail(self, check: str, file: Path | str, line: int | None, reason: str) -> None:
        self.failures.append(Failure(check, str(file), line, reason))

    def fail_at(self, check: str, entry: Entry, reason: str) -> None:
        self.fail(check, entry.path, entry.line, reason)


@dataclass
class AuditReport:
    run_dir: str
    run_id: str | None
    head: list[str]
    files: dict[str, str]  # every file audited -> its SHA-256, binding the report to the evidence
    sites: list[SiteAudit]
    failures: list[Failure]
    notes: list[str]
    empirical_settings: dict[str, Any] | None = None
    mode: str = "plain"  # or "secure aggregation (SecAgg+)"

    @property
    def passed(self) -> bool:
        return not self.failures

    def check_summary(self) -> list[dict[str, Any]]:
        out = []
        for name, what in CHECKS.items():
            if name == "empirical" and self.empirical_settings is None:
                continue
            failed = sum(f.check == name for f in self.failures)
            out.append({"check": name, "what": what, "passed": failed == 0, "failures": failed})
        return out


@dataclass
class Evidence:
    """What was read from disk; what could not be read is already a failure."""

    run_dir: Path
    server_log: Path
    site_logs: list[Path]
    simulation: bool
    run_id: str | None = None
    cfg: RunConfig | None = None
    privacy: dict[str, Any] = field(default_factory=dict)  # privacy.json "sites"
    status: dict[str, Any] | None = None
    server: list[Entry] = field(default_factory=list)  # the audited run's records only
    sites: dict[str, list[Entry]] = field(default_factory=dict)  # site name -> its log's records of the run
    site_log_of: dict[str, Path] = field(default_factory=dict)

    @property
    def privacy_path(self) -> Path:
        return self.run_dir / "privacy.json"


# ---------------------------------------------------------------------------- reading


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


def _read_json(path: Path, check: str, found: Findings) -> dict[str, Any] | None:
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
    privacy = _read_json(ev.privacy_path, "privacy", found)
    ev.status = _read_json(run_dir / "status.json", "completion", found)
    raw_cfg = _read_json(run_dir / "config.json", "privacy", found)  # JSON, not YAML: PyYAML reads 1e-05 as text
    try:
        ev.cfg = config_from_dict(raw_cfg) if raw_cfg is not None else None
    except ConfigError as err:
        found.fail("privacy", run_dir / "config.json", None, str(err))
    server = read_entries(ev.server_log)
    if privacy is not None:
        ev.run_id = privacy.get("run_id")
        ev.privacy = privacy["sites"] if isinstance(privacy.get("sites"), dict) else {}
    elif starts := [e for e in server if e.event == "run-started"]:
        ev.run_id = starts[-1].record.get("run_id")
    ev.server = [e for e in server if e.record.get("run_id") == ev.run_id]
    if not logs:
        found.notes.append("no site logs: pass --site-log FILE for each site")
    for path in logs:
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
    return ev


def _field(entry: Entry, key: str, kind: type) -> Any:
    value = entry.record.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise Malformed(entry, f"{entry.event} record lacks a valid {key!r}")
    return value


def parse_update(entry: Entry) -> Update:
    """Validate an update record's fields; Malformed names what is missing."""
    digest = _field(entry, "update", dict)
    tensors = digest.get("tensors")
    if not isinstance(digest.get("sha256"), str) or not isinstance(tensors, list):
        raise Malformed(entry, f"{entry.event} record has no valid update digest (sha256, tensors)")
    if not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tensors):
        raise Malformed(entry, f"{entry.event} record lists a tensor without a name")
    dp = entry.record.get("dp")
    if entry.event in TRAININGS and ("dp" not in entry.record or not isinstance(dp, dict | None)):
        raise Malformed(entry, f"{entry.event} record lacks 'dp' (the round's DP parameters, or null without DP)")
    names = tuple(t["name"] for t in tensors)
    return Update(entry, _field(entry, "site", str), _field(entry, "round", int), digest["sha256"], names, dp)


def collect_updates(entries: Iterable[Entry], event: str, found: Findings) -> list[Update]:
    updates = []
    for entry in entries:
        if entry.event == event:
            try:
                updates.append(parse_update(entry))
            except Malformed as err:
                found.fail_at("updates", err.entry, str(err))
    return updates


# ---------------------------------------------------------------------------- checks


def head_names(ev: Evidence, found: Findings) -> list[str]:
    """The head's tensor names as the server recorded them at run-started (and at every resume)."""
    starts = [e for e in ev.server if e.event == "run-started"]
    if not starts:
        found.fail("head-only", ev.server_log, None, f"no run-started record for run {ev.run_id}")
        return []
    head = starts[0].record.get("head")
    if not isinstance(head, list) or not head or not all(isinstance(n, str) for n in head):
        found.fail_at("head-only", starts[0], "run-started lacks the head's tensor names")
        return []
    for entry in ev.server:
        if entry.event in ("run-started", "run-resumed") and entry.record.get("head") != head:
            found.fail_at("head-only", entry, f"names head {entry.record.get('head')}, the run started with {head}")
    return sorted(head)


def check_head_only(updates: Iterable[Update], head: list[str], found: Findings) -> None:
    """Every update holds exactly the head's tensors: nothing else ever left a site.

    A SecAgg+ update is the masked head plus one masked number, the site's example weight.
    """
    for u in updates:
        allowed = {*head, MASKED_WEIGHT} if u.entry.record.get("masked") is True else set(head)
        extra, missing = sorted(set(u.tensors) - allowed), sorted(allowed - set(u.tensors))
        if extra or missing or len(u.tensors) != len(set(u.tensors)):
            what = f"tensor(s) {extra} that are not part of the head" if extra else f"{sorted(u.tensors)}, not {head}"
            found.fail_at("head-only", u.entry, f"{u.entry.event} from {u.site} in round {u.round} carries {what}")


def check_mode(updates: Iterable[Update], ev: Evidence, found: Findings) -> str:
    """Under secure aggregation every update sent and received is masked; in a plain run none is."""
    if ev.cfg is None:
        return "unknown (config.json unreadable)"
    secure = ev.cfg.secure_aggregation
    for u in updates:
        if (u.entry.record.get("masked") is True) != secure:
            what = "a plain update" if secure else "a masked update"
            mode = "secure_aggregation: true" if secure else "secure_aggregation: false"
            found.fail_at("secure-aggregation", u.entry, f"{u.entry.event} of {u.site} in round {u.round} is {what} "
                          f"in a run with {mode}")  # fmt: skip
    if secure:
        for entry in ev.server:
            if entry.event == "round-aggregated" and not isinstance(entry.record.get("secure_aggregation"), dict):
                found.fail_at("secure-aggregation", entry, "round-aggregated lacks its secure_aggregation settings")
    return (
        "secure aggregation (SecAgg+): the server received masked vectors and reconstructed only their weighted mean"
        if secure
        else "plain: the server received each site's head"
    )


def check_updates(
    received: list[Update], sent: list[Update], ev: Evidence, found: Findings
) -> dict[tuple[str, int, str], Update]:
    """Match every received update to the site's update-sent record; returns the matches by (site, round, hash)."""
    by_round: dict[tuple[str, int], list[Update]] = defaultdict(list)
    for u in sent:
        by_round[(u.site, u.round)].append(u)
    matched: dict[tuple[str, int, str], Update] = {}
    for u in received:
        what = f"update from {u.site} in round {u.round}"
        candidates = by_round.get((u.site, u.round), [])
        same = [s for s in candidates if s.sha256 == u.sha256]
        if same:
            matched[(u.site, u.round, u.sha256)] = same[0]
        elif u.site not in ev.sites:
            found.fail_at("updates", u.entry, f"{what}: no audit log of {u.site} to match it against (--site-log)")
        elif candidates:
            c = candidates[0]
            reason = f"{what} has SHA-256 {u.sha256[:16]}…, but {u.site} logged sending {c.sha256[:16]}…"
            found.fail_at("updates", u.entry, f"{reason} ({c.entry.path}:{c.entry.line})")
        else:
            reason = f"{what} was never logged as sent: {ev.site_log_of[u.site]} has no update-sent for that round"
            found.fail_at("updates", u.entry, reason)
    used = {(s.site, s.round, s.sha256) for s in matched.values()}
    for s in sent:
        if (s.site, s.round, s.sha256) not in used:
            found.notes.append(
                f"{s.entry.path}:{s.entry.line}: {s.site} sent an update in round {s.round} that the server never "
                "recorded as received (lost, refused or re-run after a restart); its ε still counts at the site"
            )
    return matched


def check_aggregation(received: list[Update], ev: Evidence, found: Findings) -> None:
    """Each round-aggregated record lists exactly the sites whose updates were received since the last one.

    Read in log order, so a round repeated after a resume is checked against its own attempt.
    """
    by_line = {u.entry.line: u for u in received}
    pending: set[str] = set()
    for entry in ev.server:
        if entry.event in ("run-started", "run-resumed"):
            pending = set()
        elif entry.line in by_line:
            pending.add(by_line[entry.line].site)
        elif entry.event == "round-aggregated":
            try:
                rnd, listed = _field(entry, "round", int), set(_field(entry, "sites", list))
            except Malformed as err:
                found.fail_at("updates", entry, str(err))
                continue
            if listed != pending:
                reason = f"round {rnd} aggregated {sorted(listed)}, but updates were received from {sorted(pending)}"
                found.fail_at("updates", entry, reason)
            pending = set()


def check_completion(ev: Evidence, found: Findings) -> None:
    """A completed run aggregated rounds 1..R and model.pt holds the head of its model-exported record."""
    if ev.status is None:
        return  # already a failure: missing or unreadable
    if ev.status.get("status") != "completed":
        found.fail("completion", ev.run_dir / "status.json", None, f"run status is {ev.status.get('status')!r}")
        return
    if ev.cfg is not None:
        done = {e.record.get("round") for e in ev.server if e.event == "round-aggregated"}
        missing = [r for r in range(1, ev.cfg.train.rounds + 1) if r not in done]
        if missing:
            found.fail("completion", ev.server_log, None, f"no round-aggregated record for round(s) {missing}")
    exports = [e for e in ev.server if e.event == "model-exported"]
    if not exports:
        found.fail("completion", ev.server_log, None, "a completed run has no model-exported record")
        return
    head = exports[-1].record.get("head")
    recorded = head.get("sha256") if isinstance(head, dict) else None
    model = ev.run_dir / "model.pt"
    actual = model_head_digest(model)
    if actual is None:
        found.fail("completion", model, None, "missing or not a fedtransfer model file")
    elif actual != recorded:
        where = f"{exports[-1].path}:{exports[-1].line}"
        found.fail("completion", model, None, f"its head is not the one the model-exported record ({where}) names")


def model_head_digest(path: Path) -> str | None:
    """SHA-256 (update_digest) of the head inside an exported model file, named as on the wire."""
    import torch  # late import: torch is heavy and only this check needs it here

    from common.exchange import PREFIX

    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        state = {PREFIX + name: tensor.numpy() for name, tensor in raw["head_state"].items()}
    except (OSError, RuntimeError, KeyError, TypeError, AttributeError, EOFError, ValueError, pickle.UnpicklingError):
        return None  # whatever it is, it is not the model the run exported
    return update_digest(state)["sha256"]


def audit_site_privacy(
    site: SiteAudit, ev: Evidence, received: list[Update], sent: list[Update], found: Findings
) -> None:
    """ε recomputed with Opacus from every training the site logged, against every ε it claimed and the target."""
    from common.privacy import EPS_SLACK  # late import: opacus; `fedtransfer --help` should not load it

    used = {(u.round, u.sha256) for u in received if u.site == site.name}
    site.rounds_joined = sorted({rnd for rnd, _ in used})
    rec = ev.privacy.get(site.name)
    if not isinstance(rec, dict):
        found.fail("privacy", ev.privacy_path, None, f"{site.name} sent updates but has no entry")
        return
    try:
        reported = {int(r["round"]): r for r in rec["per_round"] if r["status"] == "trained"}
        site.rounds_declined = [{"round": r["round"], "reason": r.get("reason", "")}
                                for r in rec["per_round"] if r["status"] != "trained"]  # fmt: skip
        site.epsilon_claimed, site.accountant = rec["epsilon"], str(rec["accountant"])
        site.delta = None if rec["delta"] is None else float(rec["delta"])  # None: the site never trained
    except (KeyError, TypeError, ValueError) as err:
        found.fail("privacy", ev.privacy_path, None, f"sites.{site.name}: malformed entry ({err!r})")
        return
    site.rounds_declined += _site_declines(ev.sites.get(site.name, []), site.rounds_declined)
    if ev.cfg is None:
        return  # config.json unreadable: already a failure
    site.target_epsilon = ev.cfg.privacy.target_epsilon
    if not ev.cfg.privacy.enabled:
        found.fail("privacy", ev.run_dir / "config.json", None, "privacy.enabled is false: no DP guarantee at all")
        return
    if sorted(reported) != site.rounds_joined:
        reason = f"{site.name} trained rounds {sorted(reported)}, but the server received its updates in rounds"
        found.fail("privacy", ev.privacy_path, None, f"{reason} {site.rounds_joined} ({ev.server_log})")
    if site.name in ev.sites:
        trainings = _logged_trainings([u for u in sent if u.site == site.name], used, reported, ev, found)
        _logged_delta(site, trainings, ev, found)
    else:  # no site log: recompute the server's copy, which is all there is
        trainings = [(rnd, r, r.get("epsilon")) for rnd, r in sorted(reported.items())]
    _recompute(site, trainings, ev.privacy_path, found)
    if site.epsilon_recomputed is not None and site.epsilon_recomputed > site.target_epsilon + EPS_SLACK:
        reason = f"{site.name}: ε {site.epsilon_recomputed:.4f} exceeds the run's target ε = {site.target_epsilon:g}"
        found.fail("privacy", ev.privacy_path, None, reason)
    if site.delta is not None and site.delta > ev.cfg.privacy.target_delta:
        reason = f"{site.name}: δ {site.delta:g} exceeds the run's target δ = {ev.cfg.privacy.target_delta:g}"
        found.fail("privacy", ev.privacy_path, None, reason)


def _logged_trainings(
    sent: list[Update], used: set[tuple[int, str]], reported: dict[int, Any], ev: Evidence, found: Findings
) -> list[tuple[int, dict[str, Any], Any]]:
    """Every training the site's own log records, in order, each with the ε privacy.json claims after it.

    A plain training is its update-sent record, paired with the server's by hash. Under
    secure aggregation it is the update-trained record (the masked update-sent carries no DP
    parameters), paired by round: the server only ever saw the masked vector.

    A training whose update the server never received still spent ε at the site, so it counts
    here; its claim is None (the next round's claim includes it).
    """
    trainings = []
    rounds_used = {rnd for rnd, _ in used}
    for u in sent:
        if u.entry.record.get("masked") is True:
            continue  # what left the site; its training is the update-trained record
        if u.dp is None:
            found.fail_at("privacy", u.entry, f"{u.site} round {u.round}: the site trained without DP")
            continue
        claimed = None
        paired = (u.round, u.sha256) in used or (u.entry.event == "update-trained" and u.round in rounds_used)
        if paired and u.round in reported:
            claimed = reported[u.round].get("epsilon")
            for key in DP_KEYS:
                if u.dp.get(key) != reported[u.round].get(key):
                    reason = f"{u.site} round {u.round}: the site logged {key} = {u.dp.get(key)!r}"
                    found.fail_at(
                        "privacy", u.entry, f"{reason}, {ev.privacy_path} reports {reported[u.round].get(key)!r}"
                    )
        trainings.append((u.round, u.dp, claimed))
    return trainings


def _logged_delta(
    site: SiteAudit, trainings: list[tuple[int, dict[str, Any], Any]], ev: Evidence, found: Findings
) -> None:
    """Recompute at the δ and accountant the site logged; privacy.json must report the same."""
    logged = {(dp.get("delta"), dp.get("accountant")) for _, dp, _ in trainings}
    if len(logged) > 1:
        found.fail("privacy", ev.site_log_of[site.name], None, f"{site.name} logged several (δ, accountant): {logged}")
    if len(logged) == 1:
        ((delta, accountant),) = logged
        if site.delta is not None and (delta, accountant) != (site.delta, site.accountant):
            reason = f"{site.name} logged δ {delta!r} with {accountant!r}, {ev.privacy_path} reports"
            found.fail("privacy", ev.site_log_of[site.name], None, f"{reason} {site.delta!r} with {site.accountant!r}")
        site.delta, site.accountant = delta, accountant


def _recompute(site: SiteAudit, trainings: list[tuple[int, dict[str, Any], Any]], path: Path, found: Findings) -> None:
    """Cumulative ε after each training, through Opacus, compared with every ε the site claimed."""
    from common.privacy import epsilon_of

    history: list[tuple[float, float, int]] = []
    last_claimed: float | None = None
    try:
        for rnd, dp, claimed in trainings:
            step = (float(dp["noise_multiplier"]), float(dp["sample_rate"]), int(dp["steps"]))
            if history and history[-1][:2] == step[:2]:  # merged, as Opacus' accountant merges them
                history[-1] = (*step[:2], history[-1][2] + step[2])
            else:
                history.append(step)
            eps = epsilon_of(history, float(site.delta), str(site.accountant))
            site.rounds.append(RoundDP(rnd, step[0], step[1], step[2], float(dp["clip_norm"]), claimed, eps))
            if claimed is not None:
                last_claimed = eps
                if not _close(claimed, eps):
                    reason = f"{site.name} round {rnd}: claims cumulative ε {claimed!r}, recomputed {eps:.6f}"
                    found.fail("privacy", path, None, reason)
    except (KeyError, TypeError, ValueError) as err:
        found.fail("privacy", path, None, f"{site.name}: unusable DP parameters ({err!r})")
        return
    site.epsilon_recomputed = site.rounds[-1].epsilon_recomputed if site.rounds else 0.0
    if site.epsilon_recomputed > (last_claimed or 0.0) * (1 + EPS_RTOL):
        found.notes.append(f"{site.name}: spent ε {site.epsilon_recomputed:.4f} by its own log, more than the last "
                           "claim the server received (a training whose update never arrived)")  # fmt: skip
    if not _close(site.epsilon_claimed, last_claimed if last_claimed is not None else 0.0):
        reason = f"{site.name}: claims ε {site.epsilon_claimed!r}, recomputed from its DP parameters"
        found.fail("privacy", path, None, f"{reason} {last_claimed or 0.0:.6f}")


def _close(claimed: Any, recomputed: float) -> bool:
    return isinstance(claimed, int | float) and math.isclose(claimed, recomputed, rel_tol=EPS_RTOL, abs_tol=1e-12)


def _site_declines(entries: list[Entry], known: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Training rounds the site's own log says it declined, which the server did not record."""
    seen = {d["round"] for d in known}
    return [
        {"round": e.record.get("round"), "reason": f"site log: {e.record.get('reason', '')}"}
        for e in entries
        if e.event == "declined" and e.record.get("message_type") == "train" and e.record.get("round") not in seen
    ]


def check_policy(site: SiteAudit, config: SiteConfig, path: Path, ev: Evidence, found: Findings) -> None:
    """The site's own limits against what it did in this run (and, with its ledger at hand, in earlier runs)."""
    from common.privacy import EPS_SLACK, PrivacyLedger
    from server.empirical_audit import site_path

    policy = config.policy
    site.policy = asdict(policy)
    violations = []
    if policy.require_dp and site.rounds_joined and not site.rounds:
        violations.append("policy.require_dp, but the site trained without DP")
    if policy.require_secure_aggregation and site.rounds_joined and ev.cfg and not ev.cfg.secure_aggregation:
        violations.append("policy.require_secure_aggregation, but the run sent its head in plain")
    if ev.cfg is not None and ev.cfg.train.rounds > policy.max_rounds:
        violations.append(f"train.rounds {ev.cfg.train.rounds} > policy.max_rounds {policy.max_rounds}")
    if site.delta is not None and site.delta > policy.max_delta:
        violations.append(f"δ {site.delta:g} > policy.max_delta {policy.max_delta:g}")
    for r in site.rounds:
        if r.noise_multiplier < policy.min_noise_multiplier:
            violations.append(f"round {r.round}: noise multiplier {r.noise_multiplier:.4g} < "
                              f"policy.min_noise_multiplier {policy.min_noise_multiplier:g}")  # fmt: skip
        if r.clip_norm > policy.max_clip_norm:
            violations.append(f"round {r.round}: clip norm {r.clip_norm:g} > policy.max_clip_norm "
                              f"{policy.max_clip_norm:g}")  # fmt: skip
    spent, scope = site.epsilon_recomputed or 0.0, "this run; no ledger at hand for earlier runs"
    ledger = site_path(path, config.state_dir) / "privacy-ledger.json"
    if ledger.is_file() and site.delta is not None and ev.run_id is not None:
        spent += PrivacyLedger(ledger, ev.run_id).spent_in_other_runs(site.delta, str(site.accountant))
        scope = f"this run plus earlier runs in {ledger}"
    if spent > policy.max_epsilon + EPS_SLACK:
        violations.append(f"ε {spent:.4f} ({scope}) > policy.max_epsilon {policy.max_epsilon:g}")
    site.policy_status = f"NOT respected: {'; '.join(violations)}" if violations else f"respected (ε counted: {scope})"
    for violation in violations:
        found.fail("policy", path, None, f"{site.name}: {violation}")


# ---------------------------------------------------------------------------- the audit


def audit_run(
    run_dir: Path,
    site_logs: Sequence[Path] = (),
    site_configs: Sequence[Path] = (),
    empirical: CanarySettings | None = None,
) -> AuditReport:
    """Run every check on RUN_DIR; the report lists every failure (none: the audit passes)."""
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: not a folder (give a run's output_dir)")
    for path in site_logs:
        if not path.is_file():
            raise ValueError(f"--site-log {path}: no such file")
    configs: dict[str, tuple[SiteConfig, Path]] = {}
    for path in site_configs:
        config = load_site_config(path)  # a user error (ConfigError naming the file), not an audit failure
        configs[config.name] = (config, path)
    found = Findings()
    ev = gather(run_dir, site_logs, found)
    for path in [ev.server_log, *ev.site_logs]:
        check_chain(path, found)
    head = head_names(ev, found)
    received = collect_updates(ev.server, "update-received", found)
    sent = collect_updates((e for entries in ev.sites.values() for e in entries), "update-sent", found)
    trained = collect_updates((e for entries in ev.sites.values() for e in entries), "update-trained", found)
    if head:
        check_head_only([*received, *sent], head, found)
    mode = check_mode([*received, *sent], ev, found)
    matched = check_updates(received, sent, ev, found)
    check_aggregation(received, ev, found)
    check_completion(ev, found)
    names = sorted(set(ev.privacy) | {u.site for u in received})
    sites = [SiteAudit(n, str(ev.site_log_of[n]) if n in ev.site_log_of else None) for n in names]
    for site in sites:
        site.updates_matched = sum(key[0] == site.name for key in matched)
        trainings = sorted([*sent, *trained], key=lambda u: (str(u.entry.path), u.entry.line))  # each log's order
        audit_site_privacy(site, ev, received, trainings, found)
        if site.name in configs:
            check_policy(site, *configs[site.name], ev, found)
        else:
            site.policy_status = "no site policy (simulation)" if ev.simulation else "not checked: no --site-config"
    for name, (_, path) in configs.items():
        if name not in names:
            found.notes.append(f"{path}: site {name} did not take part in run {ev.run_id}")
    files = _file_hashes([ev.server_log, *ev.site_logs, *site_configs], run_dir)
    report = AuditReport(str(run_dir), ev.run_id, head, files, sites, found.failures, found.notes, mode=mode)
    if empirical is not None:
        run_empirical(report, ev, configs, empirical)
    return report


def run_empirical(
    report: AuditReport, ev: Evidence, configs: dict[str, tuple[SiteConfig, Path]], settings: CanarySettings
) -> None:
    """The canary test for each site whose data is at hand, and the positive control without DP."""
    from server.empirical_audit import audit_training, deployed_site, simulated_sites

    report.empirical_settings = asdict(settings) | {"guess_counts": settings.guess_counts}
    if ev.cfg is None or not ev.cfg.privacy.enabled:
        report.notes.append("empirical test skipped: the run claims no differential privacy")
        return
    cfg = ev.cfg
    data = {s.name: s for s in simulated_sites(cfg)} if ev.simulation else {}
    data |= {name: deployed_site(cfg, config, path) for name, (config, path) in configs.items()}
    for site in report.sites:
        if site.name not in data:
            report.notes.append(f"empirical test skipped for {site.name}: its data is not here (--site-config)")
            continue
        d = data[site.name]
        site.empirical = result = audit_training(d.features, d.labels, d.num_classes, cfg, settings)
        site.control = audit_training(d.features, d.labels, d.num_classes, cfg, settings, private=False,
                                      claimed_epsilon=result.claimed_epsilon)  # fmt: skip
        if result.exceeds_claim:
            reason = f"{site.name}: empirical ε lower bound {result.eps_lower_bound:.3f} > claimed ε"
            report.failures.append(Failure("empirical", str(ev.run_dir / "config.json"), None,
                                           f"{reason} {result.claimed_epsilon:.3f} at {result.confidence:.0%} "
                                           "confidence: the DP implementation is broken"))  # fmt: skip
        if not site.control.exceeds_claim:
            weak = f"without DP the attack only proved ε ≥ {site.control.eps_lower_bound:.3f}"
            ceiling = f"at most {result.eps_ceiling:.3f} is provable with {result.num_canaries} canaries"
            report.notes.append(f"{site.name}: {weak} ({ceiling}): too weak to catch a broken run; add canaries")


def _file_hashes(logs: list[Path], run_dir: Path) -> dict[str, str]:
    files = [*logs, *(run_dir / n for n in ("privacy.json", "config.json", "status.json", "model.pt"))]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


# ---------------------------------------------------------------------------- the report


def report_data(report: AuditReport) -> dict[str, Any]:
    """The JSON report: everything the HTML shows, machine-readable."""
    data = asdict(report)
    data["verdict"] = "passed" if report.passed else "failed"
    data["checks"] = report.check_summary()
    data["failures"] = [asdict(f) | {"where": str(f)} for f in report.failures]
    return _finite(data)


def write_report(report: AuditReport, out_dir: Path) -> tuple[Path, Path]:
    """audit-report.json and a self-contained audit-report.html (plots embedded as base64 PNG)."""
    from common import atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / f"{REPORT_NAME}.json", out_dir / f"{REPORT_NAME}.html"
    atomic.write_text(json_path, json.dumps(report_data(report), indent=2, sort_keys=True, ensure_ascii=False))
    atomic.write_text(html_path, render_html(report))
    return html_path, json_path


def _finite(value: Any) -> Any:
    """JSON has no inf/nan: null instead of an invalid file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _epsilon_plot(report: AuditReport) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    targets = {s.target_epsilon for s in report.sites if s.target_epsilon is not None}
    for site in report.sites:
        if site.rounds:
            rounds = [r.round for r in site.rounds]
            (line,) = ax.plot(rounds, [r.epsilon_recomputed for r in site.rounds], marker="o", label=site.name)
            claimed = [(r.round, r.epsilon_claimed) for r in site.rounds if isinstance(r.epsilon_claimed, int | float)]
            if claimed:
                ax.scatter(*zip(*claimed, strict=True), marker="x", s=60, color=line.get_color())
    for target in targets:
        ax.axhline(target, color="red", linestyle="--", label=f"target ε = {target:g}")
    ax.set(xlabel="round", ylabel="cumulative ε", title="ε per site: recomputed (line) vs claimed (×)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _png(fig)


def _empirical_plots(report: AuditReport) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    audited = [s for s in report.sites if s.empirical is not None and s.control is not None]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    x = range(len(audited))
    bars = [
        ("claimed ε (accountant)", [s.empirical.claimed_epsilon or 0.0 for s in audited], -0.27),
        ("lower bound, DP run", [s.empirical.eps_lower_bound for s in audited], 0.0),
        ("lower bound, no DP (control)", [s.control.eps_lower_bound for s in audited], 0.27),
    ]
    for label, values, shift in bars:
        ax.bar([i + shift for i in x], values, width=0.27, label=label)
    ax.set_xticks(list(x), [s.name for s in audited])
    top = max(v for _, values, _ in bars for v in values)
    ax.set(ylabel="ε", title="Empirical ε lower bound beside the claimed ε", ylim=(0, 1.6 * top + 0.1))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small", loc="upper left")
    parts = [_png(fig)]
    for site in audited:
        fig, axes = plt.subplots(1, 2, figsize=(8, 2.8))
        for ax, result, title in ((axes[0], site.empirical, "DP run"), (axes[1], site.control, "no DP (control)")):
            ax.hist([result.scores_in, result.scores_out], bins=30, label=["included", "excluded"])
            ax.set(title=f"{site.name}: canary scores, {title}", xlabel="score")
            ax.legend(fontsize="small")
        parts.append(_png(fig))
    return "".join(parts)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.2em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;
font-size:.92em}th{background:#f3f3f3}.pass{background:#e3f5e1;border:2px solid #3a8f35}.fail{background:#fbe4e4;
border:2px solid #b3261e}.verdict{padding:.6em 1em;font-size:1.3em;font-weight:600}
code{font-size:.9em}img{max-width:100%}"""
SITE_COLUMNS = ("site", "ε claimed", "ε recomputed (Opacus)", "target ε", "δ", "accountant", "rounds joined",
                "rounds declined", "updates matched", "policy")  # fmt: skip
ROUND_COLUMNS = ("round", "noise multiplier", "sample rate", "steps", "clip norm", "ε claimed", "ε recomputed")
EMPIRICAL_COLUMNS = ("site", "ε claimed in the run", "ε of the test training (accountant)", "ε lower bound, DP",
                     "correct guesses", "ε lower bound, no DP (control)", "correct guesses",
                     "largest provable bound", "verdict")  # fmt: skip


def _site_row(s: SiteAudit) -> tuple[Any, ...]:
    declined = "; ".join(f"{d['round']}: {d['reason']}" for d in s.rounds_declined) or "none"
    joined = ", ".join(map(str, s.rounds_joined)) or "none"
    return (s.name, s.epsilon_claimed, s.epsilon_recomputed, s.target_epsilon, s.delta, s.accountant, joined,
            declined, s.updates_matched, s.policy_status)  # fmt: skip


def _empirical_row(s: SiteAudit) -> tuple[Any, ...]:
    assert s.empirical is not None and s.control is not None
    e, c = s.empirical, s.control
    verdict = "BROKEN: the bound exceeds the claim" if e.exceeds_claim else "consistent with the claim"
    return (s.name, s.epsilon_claimed, e.claimed_epsilon, e.eps_lower_bound, f"{e.num_correct}/{e.num_guesses}",
            c.eps_lower_bound, f"{c.num_correct}/{c.num_guesses}", e.eps_ceiling, verdict)  # fmt: skip


def render_html(report: AuditReport) -> str:
    """One self-contained page: verdict, failures, checks, per-site privacy, rounds, empirical test, files."""
    run = html.escape(str(report.run_id))
    verdict = "PASSED" if report.passed else f"FAILED: {len(report.failures)} failure(s)"
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>Privacy audit {run}</title>"
        f"<style>{_CSS}</style></head><body><h1>Privacy audit of run {run}</h1><p>{html.escape(report.run_dir)}</p>",
        f"<div class='verdict {'pass' if report.passed else 'fail'}'>{html.escape(verdict)}</div>",
    ]
    if report.failures:
        items = "".join(f"<li><code>{html.escape(str(f))}</code> ({f.check})</li>" for f in report.failures)
        parts.append(f"<h2>Failed checks</h2><ol>{items}</ol>")
    checks = [(c["check"], c["what"], "passed" if c["passed"] else f"FAILED ({c['failures']})")
              for c in report.check_summary()]  # fmt: skip
    parts.append("<h2>Checks</h2>" + _table(("check", "what it means", "result"), checks))
    head = html.escape(", ".join(report.head))
    parts.append(f"<h2>Sites</h2><p>Aggregation: {html.escape(report.mode)}.</p><p>Head tensors, the only ones "
                 f"allowed to leave a site: <code>{head}</code></p>")  # fmt: skip
    parts.append(_table(SITE_COLUMNS, [_site_row(s) for s in report.sites]))
    if any(s.rounds for s in report.sites):
        parts.append(_epsilon_plot(report))
    for s in report.sites:
        if s.rounds:
            rows = [(r.round, r.noise_multiplier, r.sample_rate, r.steps, r.clip_norm, r.epsilon_claimed,
                     r.epsilon_recomputed) for r in s.rounds]  # fmt: skip
            parts.append(f"<h3>{html.escape(s.name)}: DP parameters per round</h3>" + _table(ROUND_COLUMNS, rows))
        if s.policy is not None:
            parts.append(f"<p>{html.escape(s.name)} policy: <code>{html.escape(json.dumps(s.policy))}</code></p>")
    if report.empirical_settings is not None:
        parts.append(_empirical_section(report))
    if report.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in report.notes) + "</ul>")
    parts.append("<h2>Files audited</h2>" + _table(("file", "SHA-256"), sorted(report.files.items())))
    return "\n".join([*parts, "</body></html>"])


def _empirical_section(report: AuditReport) -> str:
    settings = report.empirical_settings or {}
    audited = [s for s in report.sites if s.empirical is not None and s.control is not None]
    intro = (
        f"<h2>Empirical privacy test</h2><p>{settings.get('num_canaries')} canaries per site (random unit feature "
        "directions with random labels), each included with probability 1/2, trained with the site's procedure and "
        "DP plan over every round of the run. The attack guesses the k highest-scoring canaries in and the k lowest "
        f"out, k in {settings.get('guess_counts')} (Bonferroni-corrected); each bound holds with confidence "
        f"{settings.get('confidence')}. A lower bound above the claimed ε proves the implementation broken; a bound "
        "below it does not prove the claim: the true ε lies somewhere between the two. The control trains the same "
        "way without noise or clipping, showing what the attack catches when DP is absent.</p>"
    )
    if not audited:
        return intro + "<p>No site could be tested (see the notes).</p>"
    return intro + _table(EMPIRICAL_COLUMNS, [_empirical_row(s) for s in audited]) + _empirical_plots(report)


# ---------------------------------------------------------------------------- command line


def add_audit_parser(subparsers: Any) -> None:
    """`fedtransfer audit`: registered by server/cli.py."""
    p = subparsers.add_parser("audit", help="verify a run's audit logs and privacy claims; write HTML + JSON report")
    p.add_argument("run_dir", type=Path, help="the run's output_dir (audit.jsonl, privacy.json, config.json, ...)")
    p.add_argument(
        "--site-log",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="a site's audit.jsonl, once per site (default: RUN_DIR/sites/*/audit.jsonl, simulation)",
    )
    p.add_argument(
        "--site-config",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="a site's YAML config, once per site: its policy is checked, and --empirical uses its data",
    )
    p.add_argument(
        "--empirical",
        action="store_true",
        help="also run the canary membership-inference test per site: an empirical lower bound on ε",
    )
    p.add_argument("--canaries", type=int, default=1000, help="canaries per site for --empirical (default 1000)")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence of the lower bound (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="randomness of canaries and the test training (default 0)")
    p.add_argument("--report-dir", type=Path, help="where audit-report.html and .json go (default: RUN_DIR)")
    p.set_defaults(func=audit_command)


def audit_command(args: argparse.Namespace) -> int:
    """Print a summary, every failure with file and line, and the verdict; 0 passed, 1 failed."""
    settings = None
    if args.empirical:
        from server.empirical_audit import CanarySettings

        settings = CanarySettings(args.canaries, args.confidence, args.seed)
    report = audit_run(args.run_dir, args.site_log, args.site_config, settings)
    html_path, json_path = write_report(report, args.report_dir or args.run_dir)
    matched = sum(s.updates_matched for s in report.sites)
    print(f"fedtransfer audit: run {report.run_id} in {args.run_dir}: {len(report.sites)} site(s), {matched} "
          f"update(s) matched to site logs; aggregation {report.mode}")  # fmt: skip
    for s in report.sites:
        declined = [d["round"] for d in s.rounds_declined] or "none"
        line = (f"  {s.name}: ε {_fmt(s.epsilon_claimed)} (recomputed {_fmt(s.epsilon_recomputed)}, target "
                f"{_fmt(s.target_epsilon)}), δ {_fmt(s.delta)}, {s.accountant}; rounds joined "
                f"{s.rounds_joined or 'none'}, declined {declined}; policy: {s.policy_status}")  # fmt: skip
        if s.empirical is not None and s.control is not None:
            bound, control = s.empirical.eps_lower_bound, s.control.eps_lower_bound
            line += (
                f"; empirical ε ≥ {bound:.3f} vs claimed {_fmt(s.empirical.claimed_epsilon)} (no DP: ≥ {control:.3f})"
            )
        print(line)
    for note in report.notes:
        print(f"  note: {note}")
    for failure in report.failures:
        print(f"FAIL [{failure.check}] {failure}")
    verdict = "PASSED" if report.passed else f"FAILED ({len(report.failures)} failure(s))"
    print(f"fedtransfer audit: {verdict}; report {html_path} and {json_path}")
    return 0 if report.passed else 1
