"""The evaluation releases: ε recomputed from each site's own log, and under distributed trust, masked.

A site logs every evaluation release it sends (`evaluation-sent`: its DP record and the cumulative
evaluation ε after it, and under distributed trust ε against its own messages). Here the evaluation history is
rebuilt from those records, in order, and every claim is recomputed (`epsilon_of`, the site's own composition);
the last must be within the evaluation budget (`privacy.evaluation_epsilon`, else target_epsilon) and agree with
privacy.json. Under `privacy.trust: distributed` a release a training message carried must be a Skellam share
for the masked slots (common/privacy/evaluation_skellam.py) planned as the run's training shares are: for the
fewest survivors SecAgg+ unmasks, less the colluding sites, at the public quantum γ_e. The final model's release,
an evaluation message of its own, is the local-trust Gaussian one (fully noised at the site). The coverage check
(server/audit/coverage.py) shows the masked values covered by this release.
"""

from __future__ import annotations

import math
from typing import Any

from fedtransfer.common.config.run import RunConfig
from fedtransfer.common.wire.protocol import DPRecord, Event
from fedtransfer.server.audit.findings import Evidence, Findings, SiteAudit

CHECK = "evaluation"
EPS_RTOL = 1e-6  # the same history through the same accountant agrees to float noise


def audit_evaluation(site: SiteAudit, ev: Evidence, found: Findings) -> None:
    """Every evaluation ε the site claimed, recomputed from its log; each masked release's plan checked."""
    from fedtransfer.common.privacy.calibration import epsilon_of
    from fedtransfer.common.privacy.mechanisms import event_of, mechanism_for

    if ev.cfg is None or not ev.cfg.privacy.enabled:
        return
    distributed = mechanism_for(ev.cfg).distributed
    history, delta, accountant = [], ev.cfg.privacy.target_delta, ev.cfg.privacy.accountant
    after: list[tuple[float, float | None]] = []  # (ε, ε against its own messages) after each logged release
    for entry in [e for e in ev.sites.get(site.name, []) if e.event == Event.EVALUATION_SENT]:
        rnd = entry.record.get("as_round", entry.record.get("round"))
        try:
            dp = DPRecord.from_mapping(entry.record["dp"])
            history.append(event_of(dp))
            eps = epsilon_of(history, dp.delta, dp.accountant)
            own = epsilon_of(history, dp.delta, dp.accountant, individual=True) if distributed else None
        except (KeyError, TypeError, ValueError) as err:
            found.fail_at(CHECK, entry, f"{site.name} evaluation of round {rnd}: no usable DP record ({err!r})")
            continue
        delta, accountant = dp.delta, dp.accountant
        after.append((eps, own))
        where = f"{site.name} evaluation of round {rnd}"
        if distributed and (
            reason := _masked_problem(dp, ev.cfg, carried=entry.record.get("carried_by") == "training")
        ):
            found.fail_at(CHECK, entry, f"{where}: {reason}")
        if not _close(claimed := entry.record.get("epsilon"), eps):
            found.fail_at(CHECK, entry, f"{where}: claims ε {claimed!r}, recomputed {eps:.6f}")
        claimed = entry.record.get("epsilon_individual")  # none before the first masked release
        if own is not None and claimed is not None and not _close(claimed, own):
            found.fail_at(CHECK, entry, f"{where}: claims ε against its own messages {claimed!r}, recomputed {own:.6f}")
    site.evaluation_epsilon_recomputed = epsilon_of(history, delta, accountant) if history else 0.0
    if distributed and history:
        site.evaluation_epsilon_individual_recomputed = epsilon_of(history, delta, accountant, individual=True)
    budget = ev.cfg.privacy.evaluation_budget
    if site.evaluation_epsilon_recomputed > budget * (1 + EPS_RTOL):
        reason = f"{site.name}: evaluation ε {site.evaluation_epsilon_recomputed:.4f} exceeds its budget {budget:g}"
        found.fail(CHECK, ev.site_log_of.get(site.name, ev.privacy_path), None, reason)
    _against_privacy_json(site, ev, after, found)


def _masked_problem(dp: DPRecord, cfg: RunConfig, *, carried: bool) -> str | None:
    """Why a release under distributed trust is not what the mode promises, or None."""
    from fedtransfer.common.privacy.evaluation_skellam import evaluation_quantum

    if not carried:
        return None if dp.mechanism == "gaussian" else "the final model's release must be the Gaussian one"
    if dp.mechanism != "skellam":
        return "a training message carried a plain (Gaussian) release: under distributed trust it goes masked"
    survivors, t = cfg.secagg.fewest_survivors(cfg.train.min_sites), cfg.privacy.colluding_sites
    if dp.min_survivors != survivors or dp.colluding_sites != t:
        planned = f"K_min = {dp.min_survivors}, t = {dp.colluding_sites}"
        return f"its share is planned for {planned}; the run's are {survivors} and {t}"
    if not math.isclose(dp.noise_share, dp.noise_variance / (survivors - t), rel_tol=1e-9):
        return f"its share {dp.noise_share:g} is not μ/(K_min − t) = {dp.noise_variance / (survivors - t):g}"
    if dp.quantum != evaluation_quantum(cfg.secagg):
        return f"its quantum {dp.quantum:g} is not the run's γ_e {evaluation_quantum(cfg.secagg):g}"
    return None


def _against_privacy_json(
    site: SiteAudit, ev: Evidence, after: list[tuple[float, float | None]], found: Findings
) -> None:
    """privacy.json's evaluation ε (both, under distributed trust): the log's, after the last release the server
    received (a release whose reply never arrived is in the log only: then a note)."""
    report = (ev.privacy.get(site.name) or {}).get("evaluation")
    if not isinstance(report, dict) or site.name not in ev.sites:
        return
    site.evaluation_epsilon_claimed = claimed = report.get("epsilon")
    at = next((i for i in range(len(after) - 1, -1, -1) if _close(claimed, after[i][0])), None)
    if at is None:
        reason = f"{site.name}: privacy.json's evaluation ε {claimed!r} is the log's after no release"
        found.fail(CHECK, ev.privacy_path, None, f"{reason} (recomputed: {[round(e, 6) for e, _ in after]})")
        return
    own = after[at][1]
    if "epsilon_individual" in report and (own is None or not _close(report["epsilon_individual"], own)):
        reason = f"{site.name}: privacy.json's evaluation ε against its own messages {report['epsilon_individual']!r}"
        found.fail(CHECK, ev.privacy_path, None, f"{reason}, recomputed from its log {own}")
    if at < len(after) - 1:
        found.notes.append(
            f"{site.name}: {len(after) - 1 - at} evaluation release(s) in its log never reached the server"
        )


def _close(claimed: Any, recomputed: float) -> bool:
    return isinstance(claimed, int | float) and math.isclose(claimed, recomputed, rel_tol=EPS_RTOL, abs_tol=1e-12)
