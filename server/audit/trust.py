"""Distributed trust (`privacy.trust: distributed`): every site added its share, planned for the fewest survivors.

Under distributed trust a site's ε against the coordinator holds only if the masked sum of
the fewest sites SecAgg+ unmasks carries the planned Skellam variance μ: so each site's own
log must show, for every training, the Skellam mechanism with a share μ/(K_min − t) where K_min
is what the run's SecAgg+ threshold allows (`SecAggConfig.fewest_survivors`) and t the sites that may
reveal their shares (privacy.colluding_sites, logged with each training), the unit γ the
clip norm gives, and the same plan at every site. The second ε, against one site's own
message, is recomputed from the same logs and compared with the site's claim in privacy.json.
"""

from __future__ import annotations

import math
from typing import Any

from fedtransfer.common.config.run import RunConfig
from fedtransfer.common.wire.protocol import DPRecord, Event
from fedtransfer.server.audit.findings import Evidence, Findings, SiteAudit, Update

CHECK = "trust"


def audit_trust(site: SiteAudit, ev: Evidence, sent: list[Update], found: Findings) -> None:
    """Each training the site logged added its noise share under the run's minimum-survivor plan."""
    from fedtransfer.common.privacy.mechanisms import event_of, mechanism_for

    if ev.cfg is None or not mechanism_for(ev.cfg).distributed:
        return
    expected = ev.cfg.secagg.fewest_survivors(ev.cfg.train.min_sites)
    trainings = [u for u in sent if u.site == site.name and u.entry.event == Event.UPDATE_TRAINED]
    if site.rounds_joined and site.name not in ev.sites:
        found.fail(CHECK, ev.privacy_path, None, f"{site.name}: no site log, so nothing shows it added its noise share")
        return
    if site.rounds_joined and not trainings:
        found.fail(
            CHECK,
            ev.site_log_of.get(site.name, ev.privacy_path),
            None,
            f"{site.name}: its log records no training with a noise share",
        )
    history = []
    for u in trainings:
        reason = _share_problem(u.dp, expected, ev.cfg, u.round == 0)
        if reason is not None:
            found.fail_at(CHECK, u.entry, f"{site.name} round {u.round}: {reason}")
            continue
        history.append(event_of(DPRecord.from_mapping(u.dp)))
    _individual_epsilon(site, history, ev, found)


def _share_problem(dp: dict[str, Any] | None, survivors: int, cfg: RunConfig, release: bool) -> str | None:
    """Why a logged training (or, with `release`, round 0's statistics) does not show this site's share of the
    planned noise, or None."""
    from fedtransfer.common.privacy.fedsgd import STATS_NORM

    if dp is None:
        return "trained without DP, so it added no noise share"
    try:
        rec = DPRecord.from_mapping(dp)
    except ValueError as err:
        return f"unusable DP parameters ({err})"
    if rec.mechanism != "skellam" or rec.noise_share <= 0:
        return "the log does not record adding a Skellam noise share"
    if rec.min_survivors != survivors:
        return (
            f"planned for {rec.min_survivors} surviving sites, but the run's SecAgg+ threshold lets a round "
            f"unmask {survivors}"
        )
    t = cfg.privacy.colluding_sites
    if rec.colluding_sites != t:
        return f"planned its share for {rec.colluding_sites} colluding sites, the run's privacy.colluding_sites is {t}"
    if not math.isclose(rec.noise_share * (rec.min_survivors - t), rec.noise_variance, rel_tol=1e-9):
        wanted = rec.noise_variance / (rec.min_survivors - t)
        return f"added variance {rec.noise_share:g}, not μ/(K_min − t) = {wanted:g}"
    bound = STATS_NORM if release else cfg.privacy.max_grad_norm  # the statistics: a unit's (sums, counts/4) norm
    if rec.quantum != cfg.secagg.quantum(bound) or rec.clip_norm != bound:
        return f"quantum {rec.quantum:g} and clip norm {rec.clip_norm:g} are not the run's"
    return _release_problem(rec, cfg) if release else None


def _release_problem(rec: DPRecord, cfg: RunConfig) -> str | None:
    """Round 0's Skellam release (the statistics, or the record counts alone), recomputed: one step at rate 1,
    sensitivities no smaller than the unrounded bound allows, and the variance the plan gives those
    sensitivities (plan_distributed)."""
    from fedtransfer.common.privacy.skellam import calibrate_variance

    if (rec.sample_rate, rec.steps) != (1.0, 1):
        return f"the statistics release is one step at rate 1, not {rec.steps} at {rec.sample_rate:g}"
    if rec.l2_sensitivity < rec.clip_norm / rec.quantum or rec.l1_sensitivity < rec.l2_sensitivity:
        return (
            f"the statistics release's sensitivities Δ1 = {rec.l1_sensitivity:g}, Δ2 = {rec.l2_sensitivity:g} "
            f"are below the bound {rec.clip_norm / rec.quantum:g} of one unit"
        )
    p = cfg.privacy
    mu = calibrate_variance(1.0, 1, p.target_epsilon, rec.delta, rec.l1_sensitivity, rec.l2_sensitivity)
    share, key = (p.feature_stats_share, "feature_stats_share") if p.feature_stats else (p.count_share, "count_share")
    if not math.isclose(rec.noise_variance, mu / share, rel_tol=1e-9):  # the statistics, or the counts alone
        return (
            f"the round-0 release's variance {rec.noise_variance:g} is not the plan's "
            f"{mu / share:g} (privacy.{key} {share:g})"
        )
    return None


def audit_announced_trust(ev: Evidence, trainings: list[Update], found: Findings) -> None:
    """The trust (and, distributed, the fewest survivors and colluding sites) the server announced at run-started
    and every resume: the config's, and what each site's log shows it planned its noise share for.

    A run-started record of a local-trust run may name no trust (runs recorded before the field existed):
    local trust promises no shares.
    """
    if ev.cfg is None:
        return
    from fedtransfer.common.privacy.mechanisms import mechanism_for

    trust = ev.cfg.privacy.trust
    distributed = mechanism_for(ev.cfg).distributed
    survivors = ev.cfg.secagg.fewest_survivors(ev.cfg.train.min_sites) if distributed else None
    starts = [e for e in ev.server if e.event in (Event.RUN_STARTED, Event.RUN_RESUMED)]
    for entry in starts:
        said = (entry.record.get("trust"), entry.record.get("min_survivors"))
        if (distributed or said[0] is not None) and said != (trust, survivors):
            found.fail_at(
                CHECK,
                entry,
                f"{entry.event} announces trust {said[0]!r} with min_survivors {said[1]!r}; "
                f"the run's config gives {trust!r} with {survivors!r}",
            )
        colluding = entry.record.get("colluding_sites", 0)  # runs recorded before the key: t = 0
        if distributed and colluding != ev.cfg.privacy.colluding_sites:
            found.fail_at(
                CHECK,
                entry,
                f"{entry.event} announces privacy.colluding_sites {colluding!r}; "
                f"the run's config gives {ev.cfg.privacy.colluding_sites}",
            )
    announced = starts[0].record.get("min_survivors") if starts and distributed else None
    for u in trainings if announced is not None else []:
        logged = (u.dp or {}).get("min_survivors")
        if logged is not None and logged != announced:
            found.fail_at(
                CHECK,
                u.entry,
                f"{u.site} round {u.round}: planned its share for {logged} surviving sites, "
                f"the server announced {announced!r} at {starts[0].event}",
            )


def _individual_epsilon(site: SiteAudit, history: list[Any], ev: Evidence, found: Findings) -> None:
    """ε against one site's own message (its share alone), recomputed, against the site's claim in privacy.json."""
    from fedtransfer.common.privacy.calibration import epsilon_of

    claim = (ev.privacy.get(site.name) or {}).get("epsilon_individual")
    if not history or site.delta is None:
        return
    site.epsilon_individual_claimed = claim
    site.epsilon_individual_recomputed = epsilon_of(history, site.delta, "rdp", individual=True)
    if not isinstance(claim, int | float) or not math.isclose(claim, site.epsilon_individual_recomputed, rel_tol=1e-6):
        found.fail(
            CHECK,
            ev.privacy_path,
            None,
            f"{site.name}: claims ε {claim!r} against its own message, "
            f"recomputed {site.epsilon_individual_recomputed:.6f}",
        )
