"""The checks that compare the server's log with the sites' logs and with the run's own files.

- head-only: every update sent or received holds exactly the head's tensor names, as the
  server recorded them when the run started;
- secure-aggregation: the run's mode (masked or plain) held for every update;
- updates: every update the server received was logged as sent by that site with the
  same SHA-256, and each round aggregated exactly the updates the server received;
- completion: the run completed, no round aggregated fewer sites than train.min_sites,
  and model.pt (and model.onnx / model.torchscript.pt, where exported) holds the head the
  log says was exported.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from fedtransfer.common.privacy.evaluation import NAMES as EVALUATION_SLOTS
from fedtransfer.common.privacy.fedsgd import STATS_NAMES
from fedtransfer.common.wire.exchange import MASKED_WEIGHT
from fedtransfer.common.wire.protocol import Event
from fedtransfer.server.audit.evidence import field_of, model_head_digest
from fedtransfer.server.audit.findings import Entry, Evidence, Findings, Malformed, Update

STARTS = (Event.RUN_STARTED, Event.RUN_RESUMED)


def head_names(ev: Evidence, found: Findings) -> list[str]:
    """The head's tensor names as the server recorded them at run-started (and at every resume)."""
    starts = [e for e in ev.server if e.event == Event.RUN_STARTED]
    if not starts:
        found.fail("head-only", ev.server_log, None, f"no run-started record for run {ev.run_id}")
        return []
    head = starts[0].record.get("head")
    if not isinstance(head, list) or not head or not all(isinstance(n, str) for n in head):
        found.fail_at("head-only", starts[0], "run-started lacks the head's tensor names")
        return []
    for entry in ev.server:
        if entry.event in STARTS and entry.record.get("head") != head:
            found.fail_at("head-only", entry, f"names head {entry.record.get('head')}, the run started with {head}")
    return sorted(head)


def check_head_only(
    updates: Iterable[Update], head: list[str], found: Findings, release: tuple[str, ...] = STATS_NAMES
) -> None:
    """Every update holds exactly the head's tensors: nothing else ever left a site.

    A SecAgg+ update is the masked head plus one masked number, the site's example weight; under distributed
    trust a round that carries an evaluation masks its slots too (the statistics' Skellam shares, summed: the
    coverage and evaluation checks account for them), all three or none. Round 0's update is the run's
    release, not a head: `release` names its tensors (the statistics', or the counts' alone).
    """
    for u in updates:
        allowed = {*head, MASKED_WEIGHT} if u.masked else set(head)
        if u.masked and u.round != 0 and set(EVALUATION_SLOTS) <= set(u.tensors):
            allowed |= set(EVALUATION_SLOTS)
        if u.round == 0:  # round 0 is the release (privacy.feature_stats, or the record counts), not a head
            allowed = {*release, MASKED_WEIGHT} if u.masked else set(release)
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
        if u.masked != secure:
            what = "a plain update" if secure else "a masked update"
            mode = "secure_aggregation: true" if secure else "secure_aggregation: false"
            found.fail_at(
                "secure-aggregation",
                u.entry,
                f"{u.entry.event} of {u.site} in round {u.round} is {what} in a run with {mode}",
            )
    if secure:
        for entry in ev.server:
            if entry.event == Event.ROUND_AGGREGATED and not isinstance(entry.record.get("secure_aggregation"), dict):
                found.fail_at("secure-aggregation", entry, "round-aggregated lacks its secure_aggregation settings")
    from fedtransfer.common.privacy.mechanisms import mechanism_for

    fedsgd = mechanism_for(ev.cfg).sends_gradient_sums
    if secure:
        combined = "the sum of the sites' noisy gradient sums" if fedsgd else "the weighted mean of the sites' heads"
        return f"secure aggregation (SecAgg+): the server received masked vectors and reconstructed only {combined}"
    return f"plain: the server received each site's {'noisy gradient sum' if fedsgd else 'head'}"


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
        if entry.event in STARTS:
            pending = set()
        elif entry.line in by_line:
            pending.add(by_line[entry.line].site)
        elif entry.event == Event.ROUND_AGGREGATED:
            try:
                rnd, listed = field_of(entry, "round", int), set(field_of(entry, "sites", list))
            except Malformed as err:
                found.fail_at("updates", entry, str(err))
                continue
            if listed != pending:
                reason = f"round {rnd} aggregated {sorted(listed)}, but updates were received from {sorted(pending)}"
                found.fail_at("updates", entry, reason)
            pending = set()


def check_completion(ev: Evidence, received: list[Update], found: Findings) -> None:
    """A completed run in which sites' updates were aggregated every round; model.pt holds its exported head.

    A run the server stopped (status not "completed", with its reason), a run that never
    received an update (its model is the untrained initial head), and a round that
    aggregated fewer sites than train.min_sites (the global head stayed as it was) all fail.
    """
    if ev.status is None:
        return  # already a failure: missing or unreadable
    status = ev.status.get("status")
    if status != "completed":
        why = ev.status.get("reason") or ev.status.get("error")
        found.fail("completion", ev.status_path, None, f"run status is {status!r}" + (f": {why}" if why else ""))
        return
    if not received:
        found.fail(
            "completion",
            ev.server_log,
            None,
            "no site's update was received in any round: the model is the untrained initial head",
        )
    _check_rounds(ev, found)
    _check_export(ev, found)


def _check_rounds(ev: Evidence, found: Findings) -> None:
    """Rounds 1..R each have a round-aggregated record (the last attempt counts) with at least min_sites sites."""
    if ev.cfg is None:
        return  # config.json unreadable: already a failure
    last: dict[int, Entry] = {}
    for entry in ev.server:
        if entry.event == Event.ROUND_AGGREGATED and isinstance(entry.record.get("round"), int):
            last[entry.record["round"]] = entry
    missing = [r for r in range(1, ev.cfg.train.rounds + 1) if r not in last]
    if missing:
        found.fail("completion", ev.server_log, None, f"no round-aggregated record for round(s) {missing}")
    need = ev.cfg.train.min_sites
    for rnd, entry in sorted(last.items()):
        sites = entry.record.get("sites")
        secure = entry.record.get("secure_aggregation")
        halted = secure.get("halted") if isinstance(secure, dict) else None
        if isinstance(sites, list) and len(sites) < need:
            what = f"round {rnd} aggregated {len(sites)} site(s) {sorted(map(str, sites))}"
            found.fail_at(
                "completion", entry, f"{what}, fewer than train.min_sites = {need}: the global head was left unchanged"
            )
        elif halted or entry.record.get("aggregated") is False:
            found.fail_at("completion", entry, f"round {rnd} aggregated nothing" + (f" ({halted})" if halted else ""))


def _check_export(ev: Evidence, found: Findings) -> None:
    """model.pt holds exactly the head the last model-exported record names."""
    exports = [e for e in ev.server if e.event == Event.MODEL_EXPORTED]
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
    _check_serving(ev, found, recorded)


def _check_serving(ev: Evidence, found: Findings, recorded: object) -> None:
    """model.onnx / model.torchscript.pt, where present: the file `fedtransfer export` recorded, holding the
    head that model-exported names (read from the file itself, not only from the record)."""
    from fedtransfer.common.storage.audit_log import update_digest
    from fedtransfer.server.export.serving import FILES, file_head, file_sha256  # late import: torch and onnx

    records = {e.record.get("path"): e for e in ev.server if e.event == Event.SERVING_EXPORTED}  # the last counts
    for name in FILES.values():
        path = ev.run_dir / name
        if not path.is_file():
            continue
        entry = records.get(name)
        head = entry.record.get("head") if entry is not None else None
        try:
            inside = update_digest(file_head(path))["sha256"]
        except Exception as err:  # onnx and torch.jit raise their own types on a foreign or torn file
            inside = f"unreadable ({type(err).__name__})"
        if entry is None:
            found.fail(
                "completion",
                path,
                None,
                "no serving-exported record names it: it was not written by `fedtransfer export` for this run",
            )
        elif entry.record.get("sha256") != file_sha256(path):
            found.fail("completion", path, None, f"its SHA-256 is not the one recorded at {entry.path}:{entry.line}")
        elif not isinstance(head, dict) or head.get("sha256") != recorded:
            found.fail_at("completion", entry, f"{name} was exported from a head other than the model-exported one")
        if inside != recorded:
            found.fail(
                "completion",
                path,
                None,
                f"the head inside it ({inside[:24]}) is not the head of the model-exported record",
            )
