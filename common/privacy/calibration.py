"""Privacy accounting per site: calibrate noise to the whole planned run (common/privacy/ledger.py keeps what is spent).

Opacus does the accounting; this module decides *what* is accounted: the noise
multiplier is chosen so that all rounds and local epochs the site may join together
meet its target (ε, δ), and ε of any history is composed by Opacus (`epsilon_of`).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import warnings
from dataclasses import dataclass

from fedtransfer.common.config.parse import ConfigError
from fedtransfer.common.privacy import skellam
from fedtransfer.common.privacy.fedsgd import stats_sensitivities
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier


@dataclass(frozen=True)
class DPPlan:
    """The DP parameters a site commits to for the whole run.

    `noise_multiplier`, `sample_rate` and `steps_per_round` describe each training round
    (fedsgd: one step at the Poisson rate q). With DP feature statistics, one more release
    comes first: one step at sample rate 1 with `stats_noise_multiplier`; the whole run,
    that release included, meets (target_epsilon, target_delta).
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
    # privacy.trust: distributed (common/privacy/skellam.py): the aggregate's Skellam variance μ in units of γ², the
    # fewest sites SecAgg+ unmasks (each adds μ/K_min), γ and the integer sensitivities; 0 under local trust
    noise_variance: float = 0.0
    min_survivors: int = 0
    quantum: float = 0.0
    l1_sensitivity: float = 0.0
    l2_sensitivity: float = 0.0
    # distributed trust with feature statistics: the release's Skellam variance, integer sensitivities and γ
    stats_variance: float = 0.0
    stats_l1: float = 0.0
    stats_l2: float = 0.0
    stats_quantum: float = 0.0

    @property
    def total_steps(self) -> int:
        return self.rounds * self.steps_per_round

    @property
    def distributed(self) -> bool:
        return self.min_survivors > 0

    @property
    def noise_share(self) -> float:
        """The Skellam variance this site adds per coordinate: μ/K_min."""
        return self.noise_variance / self.min_survivors

    @property
    def round_step(self) -> tuple:
        """One training round as an entry of the accountant's history (Opacus' triple, or a Skellam round)."""
        if self.distributed:
            return (
                skellam.SKELLAM,
                self.noise_variance,
                self.sample_rate,
                self.steps_per_round,
                self.l1_sensitivity,
                self.l2_sensitivity,
                self.min_survivors,
            )
        return (self.noise_multiplier, self.sample_rate, self.steps_per_round)

    @property
    def stats_step(self) -> tuple:
        """The feature-statistics release as an accountant entry: one step at rate 1, Gaussian or Skellam."""
        if self.stats_noise_multiplier is None:
            raise ValueError("this plan has no feature-statistics release")
        if self.distributed:
            return (skellam.SKELLAM, self.stats_variance, 1.0, 1, self.stats_l1, self.stats_l2, self.min_survivors)
        return (self.stats_noise_multiplier, 1.0, 1)


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Opacus' Poisson loader takes 1/sample_rate steps per epoch, sample_rate = 1/len(loader)."""
    return max(1, math.ceil(num_samples / batch_size))


@functools.lru_cache(maxsize=256)  # a pure function of its arguments, asked again every round
def plan_dp(
    num_samples: int,
    batch_size: int,
    local_epochs: int,
    rounds: int,
    target_epsilon: float,
    target_delta: float,
    max_grad_norm: float,
    accountant: str,
    stats_share: float | None = None,
) -> DPPlan:
    """fedavg: noise for the whole run, every round the site may join, every local epoch (and the statistics)."""
    per_epoch = steps_per_epoch(num_samples, batch_size)
    return _plan(
        num_samples,
        1.0 / per_epoch,
        per_epoch * local_epochs,
        rounds,
        target_epsilon,
        target_delta,
        max_grad_norm,
        accountant,
        stats_share,
        "record",
    )


@functools.lru_cache(maxsize=256)
def plan_fedsgd(
    num_units: int,
    sample_rate: float,
    rounds: int,
    target_epsilon: float,
    target_delta: float,
    max_grad_norm: float,
    accountant: str,
    stats_share: float | None = None,
    unit: str = "record",
) -> DPPlan:
    """fedsgd: one noisy gradient sum per round at Poisson rate q over `num_units` records (or users)."""
    return _plan(
        num_units, sample_rate, 1, rounds, target_epsilon, target_delta, max_grad_norm, accountant, stats_share, unit
    )


@functools.lru_cache(maxsize=256)
def plan_distributed(
    num_units: int,
    sample_rate: float,
    rounds: int,
    target_epsilon: float,
    target_delta: float,
    max_grad_norm: float,
    dim: int,
    min_survivors: int,
    gamma: float,
    stats_gamma: float,
    unit: str = "record",
    stats_share: float | None = None,
    feature_dim: int = 0,
    num_classes: int = 0,
) -> DPPlan:
    """fedsgd under distributed trust: the Skellam variance μ of the aggregate of `min_survivors` or more sites.

    μ is calibrated so that `rounds` Poisson-subsampled Skellam rounds meet the target for
    the aggregate; each site adds μ/K_min. `gamma` and `stats_gamma` are the integer units of the
    gradient sums and of the statistics (the run's SecAggConfig.quantum of their norm bounds; plain
    floats, so that a deployed site can remember the plan). The noise multiplier recorded is √μ/Δ2. With
    `stats_share`, the feature statistics (`feature_dim`, `num_classes`) come first as one
    Skellam release at rate 1 (fedtransfer.common.privacy.fedsgd.stats_sensitivities): as for the Gaussian
    release, it takes `stats_share` of the precision 1/μ of the one release that alone meets
    the target, and the rounds are calibrated on what is left (bisection over the composed ε).
    """
    _check_delta(num_units, target_delta, unit)
    d1, d2 = skellam.sensitivities(max_grad_norm, gamma, dim)
    stats_mu = s1 = s2 = 0.0
    prefix: tuple[tuple, ...] = ()
    if stats_share is not None:
        s1, s2 = stats_sensitivities(feature_dim, num_classes, unit == "user", stats_gamma)
        stats_mu = skellam.calibrate_variance(1.0, 1, target_epsilon, target_delta, s1, s2) / stats_share
        prefix = ((skellam.SKELLAM, stats_mu, 1.0, 1, s1, s2, min_survivors),)
    mu = skellam.calibrate_variance(sample_rate, rounds, target_epsilon, target_delta, d1, d2, prefix)
    return DPPlan(
        math.sqrt(mu) / d2,
        sample_rate,
        1,
        rounds,
        max_grad_norm,
        target_epsilon,
        target_delta,
        "rdp",
        math.sqrt(stats_mu) / s2 if prefix else None,
        unit,
        mu,
        min_survivors,
        gamma,
        d1,
        d2,
        stats_mu,
        s1,
        s2,
        stats_gamma if prefix else 0.0,
    )


def _check_delta(n: int, delta: float, unit: str) -> None:
    if delta >= 1.0 / n:
        what = "users" if unit == "user" else "training samples"
        raise ConfigError(
            f"privacy.target_delta {delta:g} must be below 1/n = {1.0 / n:.3g} for this site's {n} {what}; "
            "lower target_delta"
        )


def _plan(
    n: int,
    q: float,
    steps: int,
    rounds: int,
    eps: float,
    delta: float,
    clip: float,
    accountant: str,
    stats_share: float | None,
    unit: str,
) -> DPPlan:
    _check_delta(n, delta, unit)
    stats_sigma = None if stats_share is None else stats_noise_multiplier(eps, delta, stats_share, accountant)
    prefix = () if stats_sigma is None else ((stats_sigma, 1.0, 1),)
    sigma = calibrate(prefix, q, steps * rounds, eps, delta, accountant)
    return DPPlan(sigma, q, steps, rounds, clip, eps, delta, accountant, stats_sigma, unit)


def stats_noise_multiplier(target_epsilon: float, target_delta: float, share: float, accountant: str) -> float:
    """σ of the statistics release: `share` of the μ² of the one Gaussian release that alone meets the target.

    For a Gaussian mechanism μ = sensitivity/σ, and μ² adds up under composition: the release
    takes a fixed share, and the training rounds are calibrated to what is left (`calibrate`).
    """
    with warnings.catch_warnings():  # as in _epsilon: a conservative RDP order, PRV's log(1 - q) at q = 1
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        warnings.filterwarnings("ignore", message="divide by zero encountered in log")
        whole = _noise_multiplier(
            target_epsilon,
            target_delta,
            1.0,
            1,
            accountant,
            "the feature statistics' one release; raise it",
            epsilon_tolerance=0.001,
        )
    return whole / math.sqrt(share)


def _noise_multiplier(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    what: str,
    **tolerance: float,
) -> float:
    """Opacus' get_noise_multiplier; an ε no noise within its search meets is one ConfigError naming the key and
    `what` it was too small for (and what to do)."""
    try:
        return get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            **tolerance,
        )
    except ValueError:  # Opacus: "The privacy budget is too low."
        raise _too_small(target_epsilon, what) from None


def _too_small(target_epsilon: float, what: str) -> ConfigError:
    return ConfigError(f"privacy.target_epsilon: {target_epsilon:g} is too small (no noise meets it) for {what}")


def _rounds(sample_rate: float, steps: int) -> str:
    return f"{steps} step(s) at sample rate {sample_rate:g}; raise it, or lower train.rounds"


@functools.lru_cache(maxsize=256)
def calibrate(
    prefix: tuple[tuple[float, float, int], ...],
    sample_rate: float,
    steps: int,
    target_epsilon: float,
    target_delta: float,
    accountant: str,
) -> float:
    """The smallest noise multiplier (to 1%) for which `prefix` then `steps` steps at `sample_rate` meet the target.

    Opacus' get_noise_multiplier does this without a prefix; with one (the statistics
    release) the search is the same bisection over Opacus' own ε.
    """
    if not prefix:
        return _noise_multiplier(
            target_epsilon, target_delta, sample_rate, steps, accountant, _rounds(sample_rate, steps)
        )

    def eps(sigma: float) -> float:
        return epsilon_of([*prefix, (sigma, sample_rate, steps)], target_delta, accountant)

    if epsilon_of(list(prefix), target_delta, accountant) >= target_epsilon:
        raise ConfigError(
            f"privacy.feature_stats_share: the statistics release alone spends more than ε = "
            f"{target_epsilon:g}; lower it"
        )
    if eps(1e6) > target_epsilon:
        raise _too_small(target_epsilon, _rounds(sample_rate, steps))
    low, high = 0.0, 1.0
    while eps(high) > target_epsilon:
        low, high = high, 2 * high
    while high - low > 0.01 * high:
        mid = (low + high) / 2
        low, high = (mid, high) if eps(mid) > target_epsilon else (low, mid)
    return high


def epsilon_of(history: list[tuple], delta: float, accountant: str, individual: bool = False) -> float:
    """ε of a whole history of (noise multiplier, sample rate, steps), composed by Opacus.

    A history holding Skellam rounds (distributed trust) is composed in RDP by common/privacy/skellam.py,
    Gaussian steps included; `individual` then gives ε against one site's own message.
    """
    if not history:
        return 0.0
    if any(skellam.is_skellam(h) for h in history):
        return skellam.epsilon(tuple(tuple(h) for h in history), delta, individual)
    # n steps of one (σ, q) then m more are n + m steps of it: merging is exact for every accountant (Opacus'
    # own accountant.step merges the same way), and keeps a long fedsgd history one PRV composition
    merged: list[tuple[float, float, int]] = []
    for sigma, q, n in ((float(sigma), float(q), int(n)) for sigma, q, n in history):
        if merged and merged[-1][:2] == (sigma, q):
            merged[-1] = (sigma, q, merged[-1][2] + n)
        else:
            merged.append((sigma, q, n))
    return _epsilon(tuple(merged), delta, accountant)


@functools.lru_cache(maxsize=1024)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    with warnings.catch_warnings():
        # "Optimal order is the largest alpha": the RDP bound is then conservative (ε over-, never under-stated).
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        warnings.filterwarnings("ignore", message="divide by zero encountered in log")  # PRV at sample rate 1
        return float(acc.get_epsilon(delta=delta))


def require_secure_rng() -> None:
    if importlib.util.find_spec("torchcsprng") is None:
        raise ValueError(
            "privacy.secure_mode: true needs the torchcsprng package, which is not installed at this site; "
            "install it or set secure_mode: false"
        )
