"""Per-site privacy: ε recomputed from what each site logged, and the site's own policy.

- privacy: per site, ε recomputed with Opacus (`fedtransfer.common.privacy.calibration.epsilon_of`) from the DP
  parameters of every training the site logged equals each ε it claimed, and is within
  the run's target; privacy.json agrees with the logs;
- policy: each site's own limits (its site config), checked by `fedtransfer.common.privacy.policy`, the same
  function the site itself runs before it trains.

Opacus is imported late, inside the functions: `fedtransfer --help` should not load it.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedtransfer.common.config.run import SiteConfig
from fedtransfer.common.config.site import site_paths
from fedtransfer.common.wire.protocol import DPRecord, Event
from fedtransfer.server.audit.findings import Entry, Evidence, Findings, RoundDP, SiteAudit, Update

EPS_RTOL = 1e-6  # the same history through the same Opacus accountant agrees to float noise
PER_SITE_FIELDS = ("delta", "accountant")  # privacy.json keeps these once per site
PER_ROUND_FIELDS = tuple(f for f in DPRecord.FIELDS if f not in PER_SITE_FIELDS)  # ... and these per round
Training = tuple[int, DPRecord, Any]  # round, its DP parameters, the ε claimed after it (None: no claim)


def audit_site_privacy(
    site: SiteAudit, ev: Evidence, received: list[Update], sent: list[Update], found: Findings
) -> None:
    """ε recomputed with Opacus from every training the site logged, against every ε it claimed and the target."""
    from fedtransfer.common.privacy.ledger import EPS_SLACK

    used = {(u.round, u.sha256) for u in received if u.site == site.name}
    site.rounds_joined = sorted({rnd for rnd, _ in used})
    reported = _read_claims(site, ev, found)
    if reported is None or ev.cfg is None:
        return  # privacy.json or config.json unusable: already a failure
    site.target_epsilon = ev.cfg.privacy.target_epsilon
    if ev.cfg.privacy.unit == "user":  # the same composition; what one step's sampling and clipping protect differs
        found.notes.append(f"{site.name}: ε is per person (privacy.unit: user): sampling and clipping per user")
    if 0 in reported:
        what = "feature-statistics" if ev.cfg.privacy.feature_stats else "record-count"
        found.notes.append(f"{site.name}: round 0 is its DP {what} release, counted in its ε")
    if not ev.cfg.privacy.enabled:
        found.fail("privacy", ev.config_path, None, "privacy.enabled is false: no DP guarantee at all")
        return
    if sorted(reported) != site.rounds_joined:
        reason = f"{site.name} trained rounds {sorted(reported)}, but the server received its updates in rounds"
        found.fail("privacy", ev.privacy_path, None, f"{reason} {site.rounds_joined} ({ev.server_log})")
    if site.name in ev.sites:
        trainings = _logged_trainings([u for u in sent if u.site == site.name], used, reported, ev, found)
        _logged_delta(site, trainings, ev, found)
    else:  # no site log: recompute the server's copy, which is all there is
        trainings = _reported_trainings(site, reported, ev, found)
    _recompute(site, trainings, ev.privacy_path, found)
    if site.epsilon_recomputed is not None and site.epsilon_recomputed > site.target_epsilon + EPS_SLACK:
        reason = f"{site.name}: ε {site.epsilon_recomputed:.4f} exceeds the run's target ε = {site.target_epsilon:g}"
        found.fail("privacy", ev.privacy_path, None, reason)
    if site.delta is not None and site.delta > ev.cfg.privacy.target_delta:
        reason = f"{site.name}: δ {site.delta:g} exceeds the run's target δ = {ev.cfg.privacy.target_delta:g}"
        found.fail("privacy", ev.privacy_path, None, reason)


def _read_claims(site: SiteAudit, ev: Evidence, found: Findings) -> dict[int, dict[str, Any]] | None:
    """The site's privacy.json entry: its claims per trained round, its declines, ε, δ and accountant."""
    rec = ev.privacy.get(site.name)
    if not isinstance(rec, dict):
        found.fail("privacy", ev.privacy_path, None, f"{site.name} sent updates but has no entry")
        return None
    try:
        reported = {int(r["round"]): r for r in rec["per_round"] if r["status"] == "trained"}
        site.rounds_declined = [
            {"round": r["round"], "reason": r.get("reason", "")} for r in rec["per_round"] if r["status"] != "trained"
        ]
        site.epsilon_claimed, site.accountant = rec["epsilon"], str(rec["accountant"])
        site.delta = None if rec["delta"] is None else float(rec["delta"])  # None: the site never trained
    except (KeyError, TypeError, ValueError) as err:
        found.fail("privacy", ev.privacy_path, None, f"sites.{site.name}: malformed entry ({err!r})")
        return None
    site.rounds_declined += _site_declines(ev.sites.get(site.name, []), site.rounds_declined)
    return reported


def _logged_trainings(
    sent: list[Update], used: set[tuple[int, str]], reported: dict[int, Any], ev: Evidence, found: Findings
) -> list[Training]:
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
        if u.masked:
            continue  # what left the site; its training is the update-trained record
        if u.dp is None:
            found.fail_at("privacy", u.entry, f"{u.site} round {u.round}: the site trained without DP")
            continue
        try:
            dp = DPRecord.from_mapping(u.dp)
        except ValueError as err:
            found.fail_at("privacy", u.entry, f"{u.site} round {u.round}: unusable DP parameters ({err})")
            continue
        claimed = None
        paired = (u.round, u.sha256) in used or (u.entry.event == Event.UPDATE_TRAINED and u.round in rounds_used)
        if paired and u.round in reported:
            claimed = reported[u.round].get("epsilon")
            for key in PER_ROUND_FIELDS:
                if u.dp.get(key) != reported[u.round].get(key):
                    reason = f"{u.site} round {u.round}: the site logged {key} = {u.dp.get(key)!r}"
                    found.fail_at(
                        "privacy", u.entry, f"{reason}, {ev.privacy_path} reports {reported[u.round].get(key)!r}"
                    )
        trainings.append((u.round, dp, claimed))
    return trainings


def _reported_trainings(
    site: SiteAudit, reported: dict[int, dict[str, Any]], ev: Evidence, found: Findings
) -> list[Training]:
    """The trainings as privacy.json reports them (δ and accountant once per site), when no site log is at hand."""
    trainings = []
    for rnd, r in sorted(reported.items()):
        try:
            dp = DPRecord.from_mapping(r | {"delta": site.delta, "accountant": site.accountant})
        except ValueError as err:
            found.fail("privacy", ev.privacy_path, None, f"{site.name} round {rnd}: unusable DP parameters ({err})")
            continue
        trainings.append((rnd, dp, r.get("epsilon")))
    return trainings


def _logged_delta(site: SiteAudit, trainings: list[Training], ev: Evidence, found: Findings) -> None:
    """Recompute at the δ and accountant the site logged; privacy.json must report the same."""
    logged = {(dp.delta, dp.accountant) for _, dp, _ in trainings}
    if len(logged) > 1:
        found.fail("privacy", ev.site_log_of[site.name], None, f"{site.name} logged several (δ, accountant): {logged}")
    if len(logged) == 1:
        ((delta, accountant),) = logged
        if site.delta is not None and (delta, accountant) != (site.delta, site.accountant):
            reason = f"{site.name} logged δ {delta!r} with {accountant!r}, {ev.privacy_path} reports"
            found.fail("privacy", ev.site_log_of[site.name], None, f"{reason} {site.delta!r} with {site.accountant!r}")
        site.delta, site.accountant = delta, accountant


def _recompute(site: SiteAudit, trainings: list[Training], path: Path, found: Findings) -> None:
    """Cumulative ε after each training, through Opacus, compared with every ε the site claimed."""
    from fedtransfer.common.privacy.calibration import (
        epsilon_of,  # composes (and merges) the history as the site's accountant does
    )
    from fedtransfer.common.privacy.events import History
    from fedtransfer.common.privacy.mechanisms import event_of

    if trainings and (site.delta is None or site.accountant is None):
        found.fail("privacy", path, None, f"{site.name}: trained, but no δ and accountant to recompute ε with")
        return
    history: History = []
    last_claimed: float | None = None
    try:
        for rnd, dp, claimed in trainings:
            history.append(event_of(dp))
            eps = epsilon_of(history, float(site.delta or 0.0), str(site.accountant))
            site.rounds.append(RoundDP(rnd, dp.noise_multiplier, dp.sample_rate, dp.steps, dp.clip_norm, claimed, eps))
            if claimed is not None:
                last_claimed = eps
                if not _close(claimed, eps):
                    reason = f"{site.name} round {rnd}: claims cumulative ε {claimed!r}, recomputed {eps:.6f}"
                    found.fail("privacy", path, None, reason)
    except ValueError as err:  # an accountant Opacus does not know, a δ it cannot take
        found.fail("privacy", path, None, f"{site.name}: unusable DP parameters ({err!r})")
        return
    site.epsilon_recomputed = site.rounds[-1].epsilon_recomputed if site.rounds else 0.0
    if site.epsilon_recomputed > (last_claimed or 0.0) * (1 + EPS_RTOL):
        found.notes.append(
            f"{site.name}: spent ε {site.epsilon_recomputed:.4f} by its own log, more than the last "
            "claim the server received (a training whose update never arrived)"
        )
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
        if e.event == Event.DECLINED and e.record.get("message_type") == "train" and e.record.get("round") not in seen
    ]


def check_policy(site: SiteAudit, config: SiteConfig, path: Path, ev: Evidence, found: Findings) -> None:
    """The site's own limits against what it did in this run and, its ledger at hand, in the runs before it."""
    from fedtransfer.common.privacy.mechanisms import mechanism_for
    from fedtransfer.common.privacy.policy import DPSettings, PolicyUse, personal_uses, policy_violations

    site.policy = asdict(config.policy)
    took_part = bool(site.rounds_joined)
    earlier, scope = _earlier_runs(site, config, path, ev, found)
    use = PolicyUse(
        rounds=ev.cfg.train.rounds if ev.cfg is not None else None,
        without_dp=took_part and not site.rounds,
        plain_aggregation=took_part and ev.cfg is not None and not ev.cfg.secure_aggregation,
        delta=site.delta,
        epsilon=site.epsilon_recomputed or 0.0,
        epsilon_earlier=earlier,
        epsilon_scope=scope,
        trainings=tuple(DPSettings(f"round {r.round}", r.noise_multiplier, r.clip_norm) for r in site.rounds),
        distributed_trust=took_part and ev.cfg is not None and mechanism_for(ev.cfg).distributed,
        colluding_sites=ev.cfg.privacy.colluding_sites if ev.cfg is not None else 0,  # as logged: the trust check
        personal=personal_uses(e.record for e in ev.sites.get(site.name, []) if e.event == Event.PERSONAL_TRAINED),
    )
    violations = policy_violations(config.policy, use)
    site.policy_status = f"NOT respected: {'; '.join(violations)}" if violations else f"respected (ε counted: {scope})"
    for violation in violations:
        found.fail("policy", path, None, f"{site.name}: {violation}")


def _earlier_runs(site: SiteAudit, config: SiteConfig, path: Path, ev: Evidence, found: Findings) -> tuple[float, str]:
    """ε the site had spent in other runs when the audited run began, and in words what was counted.

    Only runs the ledger held before this run are counted: a site that ran again after an
    honest run must not make that run fail its audit afterwards.
    """
    from fedtransfer.common.privacy.ledger import PrivacyLedger

    ledger = site_paths(config, path).state_dir / "privacy-ledger.json"
    if not ledger.is_file():
        return 0.0, "this run; no ledger at hand for earlier runs"
    if site.delta is None or ev.run_id is None:
        return 0.0, "this run, in which the site did not train"
    try:
        before = PrivacyLedger(ledger, ev.run_id).spent_before(site.delta, str(site.accountant))
        unknown = f"{ledger} has no entry for run {ev.run_id}, so which runs came before it is unknown"
    except RuntimeError as err:  # a corrupt ledger: say so, the audit of this run goes on
        before, unknown = None, str(err)
    if before is not None:
        return before, f"this run plus the runs {ledger} held before it"
    found.notes.append(f"{site.name}: earlier runs not counted against policy.max_epsilon: {unknown}")
    return 0.0, f"this run only; earlier runs cannot be counted: {unknown}"
