"""Distributed trust (`privacy.trust: distributed`): every site added its share, planned for the fewest survivors.

Under distributed trust a site's ε against the coordinator holds only if the masked sum of
the fewest sites SecAgg+ unmasks carries the planned Skellam variance μ: so each site's own
log must show, for every training, the Skellam mechanism with a share μ/K_min where K_min
is what the run's SecAgg+ threshold allows (`SecAggConfig.fewest_survivors`), the unit γ the
clip norm gives, and the same plan at every site. The second ε, against one site's own
message, is recomputed from the same logs and compared with the site's claim in privacy.json.
"""

from __future__ import annotations

import math
from typing import Any

from common.protocol import DPRecord, Event
from server.audit.findings import Evidence, Findings, SiteAudit, Update

CHECK = "trust"


def audit_trust(site: SiteAudit, ev: Evidence, sent: list[Update], found: Findings) -> None:
    """Each training the site logged added its noise share under the run's minimum-survivor plan."""
    if ev.cfg is None or ev.cfg.privacy.trust != "distributed":
        return
    expected = ev.cfg.secagg.fewest_survivors(ev.cfg.train.min_sites)
    trainings = [u for u in sent if u.site == site.name and u.entry.event == Event.UPDATE_TRAINED]
    if site.rounds_joined and site.name not in ev.sites:
        found.fail(CHECK, ev.privacy_path, None, f"{site.name}: no site log, so nothing shows it added its noise share")
        return
    if site.rounds_joined and not trainings:
        found.fail(CHECK, ev.site_log_of.get(site.name, ev.privacy_path), None,
                   f"{site.name}: its log records no training with a noise share")  # fmt: skip
    history = []
    for u in trainings:
        reason = _share_problem(u.dp, expected, ev.cfg.privacy.max_grad_norm)
        if reason is not None:
            found.fail_at(CHECK, u.entry, f"{site.name} round {u.round}: {reason}")
            continue
        history.append(DPRecord.from_mapping(u.dp).history_step)
    _individual_epsilon(site, history, ev, found)


def _share_problem(dp: dict[str, Any] | None, survivors: int, clip_norm: float) -> str | None:
    """Why a logged training does not show this site's share of the planned noise, or None."""
    from common.skellam import quantum

    if dp is None:
        return "trained without DP, so it added no noise share"
    try:
        rec = DPRecord.from_mapping(dp)
    except ValueError as err:
        return f"unusable DP parameters ({err})"
    if rec.mechanism != "skellam" or rec.noise_share <= 0:
        return "the log does not record adding a Skellam noise share"
    if rec.min_survivors != survivors:
        return (f"planned for {rec.min_survivors} surviving sites, but the run's SecAgg+ threshold lets a round "
                f"unmask {survivors}")  # fmt: skip
    if not math.isclose(rec.noise_share * rec.min_survivors, rec.noise_variance, rel_tol=1e-9):
        return f"added variance {rec.noise_share:g}, not μ/K_min = {rec.noise_variance / rec.min_survivors:g}"
    if rec.quantum != quantum(clip_norm) or rec.clip_norm != clip_norm:
        return f"quantum {rec.quantum:g} and clip norm {rec.clip_norm:g} are not the run's"
    return None


def _individual_epsilon(site: SiteAudit, history: list[tuple], ev: Evidence, found: Findings) -> None:
    """ε against one site's own message (its share alone), recomputed, against the site's claim in privacy.json."""
    from common.privacy import epsilon_of

    claim = (ev.privacy.get(site.name) or {}).get("epsilon_individual")
    if not history or site.delta is None:
        return
    site.epsilon_individual_claimed = claim
    site.epsilon_individual_recomputed = epsilon_of(history, site.delta, "rdp", individual=True)
    if not isinstance(claim, int | float) or not math.isclose(claim, site.epsilon_individual_recomputed,
                                                              rel_tol=1e-6):  # fmt: skip
        found.fail(CHECK, ev.privacy_path, None, f"{site.name}: claims ε {claim!r} against its own message, "
                   f"recomputed {site.epsilon_individual_recomputed:.6f}")  # fmt: skip
