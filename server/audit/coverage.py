"""The coverage check: every value a site logged as sent is covered by a named release or public setting.

A site logs each reply's values (`sent`: tensors by hash, metrics by name, config records by key;
common/privacy/coverage.py). Here each is marked with what covers it: a release whose ε the privacy
check recomputes (training, feature-stats, evaluation), the DP record itself (accounting), or public
configuration. A value nothing covers fails the audit: a plain metric, an exact count (or a sample rate or
expected batch computed from one), a timing. A sending record that lists no values fails too, since what it
sent cannot be shown covered. A training reply that carries an evaluation (one message a round) lists its
statistics too: they are covered by the evaluation release only where the site's log holds that release, with
the same statistics hash.
"""

from __future__ import annotations

from typing import Any

from fedtransfer.common.privacy.coverage import DP_RATE, RELEASES, TRAINING, Released, cover
from fedtransfer.common.privacy.evaluation import EVALUATION
from fedtransfer.common.wire.protocol import Event, Rec
from fedtransfer.server.audit.findings import Evidence, Findings, SiteAudit

SENDING = (Event.UPDATE_SENT, Event.UPDATE_TRAINED, Event.EVALUATION_SENT)
KINDS = ("tensors", "metrics", "configs")


def check_coverage(site: SiteAudit, ev: Evidence, found: Findings) -> None:
    """Fill `site.coverage` (one row per value sent) and fail every value no release or setting covers.

    Under DP a value that depends on the site's size (its weight, q·n, fedavg's DP sample rate and steps) is
    covered by round 0's release only when it is what the count released there gives (common/privacy/coverage.py
    `follows`): an exact count, or a rate computed from one, fails.
    """
    entries = [e for e in ev.sites.get(site.name, []) if e.event in SENDING]
    private = ev.cfg is None or ev.cfg.privacy.enabled
    released = _released(entries)
    # the statistics of every evaluation release the site logged: a training reply carrying one (the model it
    # received, scored first) lists them by the same hash, covered by that release
    evaluations = {_sha(e.record.get("statistics")) for e in entries if e.event == Event.EVALUATION_SENT} - {None}
    slotted = _masked_evaluations(entries, evaluations)
    for entry in entries:
        if entry.record.get("masked"):  # SecAgg+'s masking of the values the update-trained record lists
            site.coverage.append(_row(entry, "tensors", "masked vectors", "", "secure aggregation of update-trained"))
            if entry.record.get("round") in slotted:  # distributed trust: the evaluation's share, in the mask
                site.coverage.append(_row(entry, "tensors", "masked evaluation slots", "", EVALUATION))
            continue
        sent = entry.record.get("sent")
        if not isinstance(sent, dict):
            found.fail_at("coverage", entry, f"{entry.event} of round {entry.record.get('round')} lists no values sent")
            continue
        release = entry.record.get("release") or TRAINING
        items = [(kind, name, value) for kind in KINDS for name, value in _items(sent.get(kind))]
        dp = entry.record.get("dp")
        if entry.event != Event.EVALUATION_SENT and isinstance(dp, dict) and "sample_rate" in dp:
            items.append(("metrics", DP_RATE, dp["sample_rate"]))  # inside the DP record: it may follow from n
        for kind, name, value in items:
            carried = kind == "tensors" and name == Rec.EVALUATION and value in evaluations
            covered = cover(
                kind,
                name,
                value,
                release=EVALUATION if carried else release,
                private=private,
                released=released,
                cfg=ev.cfg,
            )
            site.coverage.append(_row(entry, kind, name, _shown(value), covered or "NOT COVERED"))
            if covered is None:
                found.fail_at(
                    "coverage",
                    entry,
                    f"{site.name} sent {kind[:-1]} {name!r} = {_shown(value)} in round {entry.record.get('round')}, "
                    "covered by no release and not public configuration (under DP a size must follow from the "
                    "count released in round 0)",
                )


def _released(entries: list[Any]) -> Released | None:
    """The count this site released in round 0, as its release's record names it; None where it released none."""
    for entry in entries:
        release, count = entry.record.get("release"), entry.record.get("released_count")
        if release in RELEASES and isinstance(count, int | float) and not isinstance(count, bool):
            return Released(str(release), float(count))
    return None


def _masked_evaluations(entries: list[Any], evaluations: set[str | None]) -> set[Any]:
    """Rounds whose masked vectors hold an evaluation release's values (distributed trust: the slots): the
    update-trained record lists them under the hash of an evaluation-sent record, a Skellam share."""
    shares = {
        _sha(e.record.get("statistics"))
        for e in entries
        if e.event == Event.EVALUATION_SENT and (e.record.get("dp") or {}).get("mechanism") == "skellam"
    }
    return {
        e.record.get("round")
        for e in entries
        if e.event == Event.UPDATE_TRAINED
        and isinstance(e.record.get("sent"), dict)
        and (sha := (e.record["sent"].get("tensors") or {}).get(Rec.EVALUATION)) in evaluations
        and sha in shares
    }


def _sha(digest: Any) -> str | None:
    return digest.get("sha256") if isinstance(digest, dict) else None


def _row(entry: Any, kind: str, name: str, value: Any, covered_by: str) -> dict[str, Any]:
    return {
        "round": entry.record.get("round"),
        "event": entry.event,
        "kind": kind,
        "name": name,
        "value": value,
        "covered_by": covered_by,
    }


def _items(values: Any) -> list[tuple[str, Any]]:
    return sorted(values.items()) if isinstance(values, dict) else []


def _shown(value: Any) -> Any:
    """A hash shortened, a config record's keys joined, a number as it was."""
    if isinstance(value, str):
        return value[:16]
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return value
