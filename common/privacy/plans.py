"""The DP parameters a site commits to for a whole run: a Gaussian plan or a Skellam plan.

One plan type per noise: a Gaussian plan (local trust: the site's own noise, Opacus' accountants)
carries no Skellam fields, and a Skellam plan (distributed trust: a share of the aggregate's noise
under SecAgg+) no Gaussian σ of its own. Each says what one round and the feature-statistics release
cost as accountant events (common/privacy/events.py); `as_record`/`plan_from_record` keep it on disk.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from fedtransfer.common.privacy.events import SelfComposedDpEvent, gaussian_steps, skellam_steps


@dataclass(frozen=True)
class GaussianPlan:
    """Gaussian noise σ·C per step; `steps_per_round` steps at Poisson rate q each round.

    Round 0's release comes first, one step at rate 1 with `stats_noise_multiplier`: the feature statistics,
    or without them the record counts (common/privacy/counts.py; the config says which); the whole run, that
    release included, meets (target_epsilon, target_delta).
    """

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    max_grad_norm: float
    target_epsilon: float
    target_delta: float
    accountant: str
    stats_noise_multiplier: float | None = None
    unit: str = "record"  # what one step's sampling and clipping protect: a record, or a user's records

    distributed = False  # the noise is the site's own: ε holds against anyone who sees its message

    @property
    def total_steps(self) -> int:
        return self.rounds * self.steps_per_round

    @property
    def has_release(self) -> bool:
        return self.stats_noise_multiplier is not None

    @property
    def round_event(self) -> SelfComposedDpEvent:
        return gaussian_steps(self.noise_multiplier, self.sample_rate, self.steps_per_round)

    @property
    def stats_event(self) -> SelfComposedDpEvent:
        """Round 0's release (the feature statistics or the record counts): one Gaussian step at rate 1."""
        if self.stats_noise_multiplier is None:
            raise ValueError("this plan has no round-0 release")
        return gaussian_steps(self.stats_noise_multiplier, 1.0, 1)

    def as_record(self) -> dict[str, Any]:
        return {"mechanism": "gaussian", **asdict(self)}


@dataclass(frozen=True)
class SkellamPlan:
    """Skellam noise of variance μ (in units of γ²) on the aggregate of the fewest sites SecAgg+ unmasks.

    Each site adds μ/(K_min − t) (`noise_share`), t the sites that may reveal their own shares
    (privacy.colluding_sites): any K_min − t honest shares then carry μ. Round 0's release (the statistics, or
    the record counts alone) is its own Skellam release with its variance, integer sensitivities and quantum
    (`stats_*`, None without it).
    """

    noise_variance: float
    sample_rate: float
    rounds: int
    max_grad_norm: float
    target_epsilon: float
    target_delta: float
    min_survivors: int
    quantum: float
    l1_sensitivity: float
    l2_sensitivity: float
    unit: str = "record"
    stats_variance: float | None = None
    stats_l1: float | None = None
    stats_l2: float | None = None
    stats_quantum: float | None = None
    colluding_sites: int = 0  # t: sites that may reveal their shares; the K_min − t honest shares carry μ

    distributed = True  # ε holds for the aggregate; a second ε against the site's own message
    accountant = "rdp"  # the Skellam mechanism is accounted in RDP (common/privacy/skellam.py)
    steps_per_round = 1

    @property
    def total_steps(self) -> int:
        return self.rounds

    @property
    def has_release(self) -> bool:
        return self.stats_variance is not None

    @property
    def noise_multiplier(self) -> float:
        """√μ/Δ2: the Gaussian-equivalent σ a site policy's minimum noise is checked against."""
        return math.sqrt(self.noise_variance) / self.l2_sensitivity

    @property
    def stats_noise_multiplier(self) -> float | None:
        if self.stats_variance is None or self.stats_l2 is None:
            return None
        return math.sqrt(self.stats_variance) / self.stats_l2

    @property
    def honest_survivors(self) -> int:
        """K_min − t: the fewest shares the coordinator cannot subtract, which together carry the planned variance."""
        return self.min_survivors - self.colluding_sites

    @property
    def noise_share(self) -> float:
        """The Skellam variance this site adds per coordinate: μ/(K_min − t)."""
        return self.noise_variance / self.honest_survivors

    @property
    def stats_share(self) -> float | None:
        """The Skellam variance this site adds to each statistics coordinate: μ_stats/(K_min − t)."""
        return None if self.stats_variance is None else self.stats_variance / self.honest_survivors

    @property
    def round_event(self) -> SelfComposedDpEvent:
        return skellam_steps(
            self.noise_variance,
            self.sample_rate,
            1,
            l1=self.l1_sensitivity,
            l2=self.l2_sensitivity,
            min_survivors=self.min_survivors,
            colluding_sites=self.colluding_sites,
        )

    @property
    def stats_event(self) -> SelfComposedDpEvent:
        """Round 0's release (the feature statistics or the record counts): one Skellam release at rate 1."""
        if self.stats_variance is None or self.stats_l1 is None or self.stats_l2 is None:
            raise ValueError("this plan has no round-0 release")
        return skellam_steps(
            self.stats_variance,
            1.0,
            1,
            l1=self.stats_l1,
            l2=self.stats_l2,
            min_survivors=self.min_survivors,
            colluding_sites=self.colluding_sites,
        )

    def as_record(self) -> dict[str, Any]:
        return {"mechanism": "skellam", **asdict(self)}


Plan = GaussianPlan | SkellamPlan


def plan_from_record(raw: dict[str, Any]) -> Plan:
    """A plan as `as_record` wrote it; TypeError for a record of another shape (a plan of older code)."""
    kinds = {"gaussian": GaussianPlan, "skellam": SkellamPlan}
    values = dict(raw)
    kind = kinds.get(values.pop("mechanism", None))  # records of the one-class DPPlan had no mechanism
    if kind is None or set(values) != {f.name for f in fields(kind)}:
        raise TypeError("not a plan of this code's shape")
    return kind(**values)
