"""A site's own privacy policy, checked by one function on both sides of the federation.

The site checks a run's plan against its policy before it trains (client/site.py), and
the auditor checks what the site logged against the same policy afterwards
(`fedtransfer audit --site-config`). Both describe what they know as a `PolicyUse` and
ask `policy_violations`, so the two can never disagree about what a limit means.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fedtransfer.common.config.run import SitePolicy
from fedtransfer.common.config.site import SitePersonal
from fedtransfer.common.privacy.ledger import EPS_SLACK


@dataclass(frozen=True)
class DPSettings:
    """The noise and clipping of one training (or of the plan every training follows)."""

    where: str  # names it in a violation: "round 3", "the plan"
    noise_multiplier: float
    clip_norm: float


@dataclass(frozen=True)
class PersonalUse:
    """One training of the site's personal model, as its `personal-trained` audit record states it."""

    where: str  # names it in a violation: "round 3"
    dp: bool
    target_epsilon: float | None  # the DP plan's target (None without DP)
    epsilon: float | None  # the ε its own ledger counted after it (None without DP)


def personal_uses(records: Iterable[Mapping[str, Any]]) -> tuple[PersonalUse, ...]:
    """The personal trainings in a site's audit records (`personal-trained`), for `policy_violations`.

    A record that does not state its DP choice counts as trained without DP: the site's log
    must show that the site's choice was followed, not leave it to be assumed.
    """
    out = []
    for r in records:
        dp = r.get("dp") if isinstance(r.get("dp"), Mapping) else {}
        eps, target = r.get("epsilon"), dp.get("target_epsilon")
        out.append(
            PersonalUse(
                f"round {r.get('round')}",
                r.get("dp_chosen") is True and bool(dp),
                target if isinstance(target, int | float) else None,
                eps if isinstance(eps, int | float) else None,
            )
        )
    return tuple(out)


def _shown(value: float | None) -> str:
    return "none" if value is None else f"{value:.4g}"


def _personal_violations(own: SitePersonal, uses: tuple[PersonalUse, ...]) -> list[str]:
    """Each personal training that went against the site's own `policy.personal` choice (to keep one at all, DP, ε)."""
    found = []
    for u in uses:
        if own.keep is False:  # then dp and target_epsilon are unset: nothing else to check
            found.append(f"{u.where}: a personal model trained, but policy.personal.keep is false")
        if own.dp is not None and u.dp != own.dp:
            found.append(
                f"{u.where}: the personal model trained {'with' if u.dp else 'without'} DP, but "
                f"policy.personal.dp is {str(own.dp).lower()}"
            )
        limit = own.target_epsilon
        if limit is not None and u.dp and max(u.target_epsilon or 0.0, u.epsilon or 0.0) > limit + EPS_SLACK:
            found.append(
                f"{u.where}: the personal model's ε (target {_shown(u.target_epsilon)}, spent "
                f"{_shown(u.epsilon)}) > policy.personal.target_epsilon {limit:g}"
            )
    return found


@dataclass(frozen=True)
class PolicyUse:
    """What a run asks of a site (before training) or what the site did in it (at the audit).

    `epsilon` is this run's ε (the target at the site, the recomputed ε at the audit) and
    `epsilon_earlier` what other runs on the same data spent before it; `epsilon_scope`
    says in words what was counted, for the violation message.
    """

    rounds: int | None  # train.rounds of the run; None: unknown
    without_dp: bool  # the site trains (or trained) without differential privacy
    plain_aggregation: bool  # the site's head goes (or went) out unmasked
    delta: float | None  # None: no training, so no δ
    epsilon: float
    epsilon_earlier: float
    epsilon_scope: str
    trainings: tuple[DPSettings, ...] = ()
    distributed_trust: bool = False  # privacy.trust: distributed (the site adds only its share of the noise)
    colluding_sites: int = 0  # distributed trust: revealed shares the plan survives (privacy.colluding_sites)
    personal: tuple[PersonalUse, ...] = ()  # the site's own model, trained in the run (audit: its log's records)


def policy_violations(policy: SitePolicy, use: PolicyUse) -> list[str]:
    """Every limit of `policy` that `use` passes, each naming the policy key; empty when it is respected."""
    found = []
    if policy.require_dp and use.without_dp:
        found.append("policy.require_dp: the site requires differential privacy, but the run trains without it")
    if policy.require_secure_aggregation and use.plain_aggregation:
        found.append(
            "policy.require_secure_aggregation: the site requires secure aggregation, but the head goes out "
            "in plain (secure_aggregation: false)"
        )
    if use.distributed_trust and not policy.allow_distributed_trust:
        found.append(
            "policy.allow_distributed_trust: under privacy.trust: distributed the site adds only a share of "
            "the noise, and its policy does not allow that (set it true, or run with trust: local)"
        )
    if use.distributed_trust and use.colluding_sites < policy.min_colluding_sites:
        found.append(
            f"policy.min_colluding_sites: the site requires the noise to hold against {policy.min_colluding_sites} "
            f"site(s) revealing their shares, but the run plans for privacy.colluding_sites = {use.colluding_sites}"
        )
    if use.rounds is not None and use.rounds > policy.max_rounds:
        found.append(f"train.rounds {use.rounds} > policy.max_rounds {policy.max_rounds}")
    if use.delta is not None and use.delta > policy.max_delta:
        found.append(f"δ {use.delta:g} > policy.max_delta {policy.max_delta:g}")
    total = use.epsilon + use.epsilon_earlier
    if total > policy.max_epsilon + EPS_SLACK:
        found.append(f"ε {total:.4g} ({use.epsilon_scope}) > policy.max_epsilon {policy.max_epsilon:g}")
    for t in use.trainings:
        if t.noise_multiplier < policy.min_noise_multiplier:
            found.append(
                f"{t.where}: noise multiplier {t.noise_multiplier:.4g} < policy.min_noise_multiplier "
                f"{policy.min_noise_multiplier:g}"
            )
        if t.clip_norm > policy.max_clip_norm:
            found.append(f"{t.where}: clip norm {t.clip_norm:g} > policy.max_clip_norm {policy.max_clip_norm:g}")
    return found + _personal_violations(policy.personal, use.personal)
