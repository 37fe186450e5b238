"""A site's own privacy policy, checked by one function on both sides of the federation.

The site checks a run's plan against its policy before it trains (client/site.py), and
the auditor checks what the site logged against the same policy afterwards
(`fedtransfer audit --site-config`). Both describe what they know as a `PolicyUse` and
ask `policy_violations`, so the two can never disagree about what a limit means.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.config import SitePolicy
from common.privacy import EPS_SLACK


@dataclass(frozen=True)
class DPSettings:
    """The noise and clipping of one training (or of the plan every training follows)."""

    where: str  # names it in a violation: "round 3", "the plan"
    noise_multiplier: float
    clip_norm: float


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


def policy_violations(policy: SitePolicy, use: PolicyUse) -> list[str]:
    """Every limit of `policy` that `use` passes, each naming the policy key; empty when it is respected."""
    found = []
    if policy.require_dp and use.without_dp:
        found.append("policy.require_dp: the site requires differential privacy, but the run trains without it")
    if policy.require_secure_aggregation and use.plain_aggregation:
        found.append("policy.require_secure_aggregation: the site requires secure aggregation, but the head goes out "
                     "in plain (secure_aggregation: false)")  # fmt: skip
    if use.rounds is not None and use.rounds > policy.max_rounds:
        found.append(f"train.rounds {use.rounds} > policy.max_rounds {policy.max_rounds}")
    if use.delta is not None and use.delta > policy.max_delta:
        found.append(f"δ {use.delta:g} > policy.max_delta {policy.max_delta:g}")
    total = use.epsilon + use.epsilon_earlier
    if total > policy.max_epsilon + EPS_SLACK:
        found.append(f"ε {total:.4g} ({use.epsilon_scope}) > policy.max_epsilon {policy.max_epsilon:g}")
    for t in use.trainings:
        if t.noise_multiplier < policy.min_noise_multiplier:
            found.append(f"{t.where}: noise multiplier {t.noise_multiplier:.4g} < policy.min_noise_multiplier "
                         f"{policy.min_noise_multiplier:g}")  # fmt: skip
        if t.clip_norm > policy.max_clip_norm:
            found.append(f"{t.where}: clip norm {t.clip_norm:g} > policy.max_clip_norm {policy.max_clip_norm:g}")
    return found
