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
from collections.abc import Sequence

from fedtransfer.common.config.parse import ConfigError
from fedtransfer.common.privacy import skellam
from fedtransfer.common.privacy.events import (
    SelfComposedDpEvent,
    all_gaussian,
    gaussian_steps,
    skellam_steps,
    to_opacus,
)
from fedtransfer.common.privacy.fedsgd import stats_sensitivities
from fedtransfer.common.privacy.plans import GaussianPlan, SkellamPlan
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Opacus' Poisson loader takes 1/sample_rate steps per epoch, sample_rate = 1/len(loader)."""
    return max(1, math.ceil(num_samples / batch_size))


@functools.lru_cache(maxsize=256)  # a pure function of its arguments, asked again every round
def plan_dp(
    *,
    num_samples: int,
    batch_size: int,
    local_epochs: int,
    rounds: int,
    target_epsilon: float,
    target_delta: float,
    max_grad_norm: float,
    accountant: str,
    stats_share: float | None = None,
    released_count: int | None = None,
) -> GaussianPlan:
    """fedavg: noise for the whole run, every round the site may join, every local epoch (and round 0's release).

    The Poisson rate is 1/⌈n/batch⌉ (about batch/n, at most 1) with n the site's `released_count` when it has
    one: the rate goes out in every DP record, and from an exact n it would give n away; from the released
    count it is post-processing of an accounted release, and Poisson sampling at any rate is accounted at that
    rate, so the accounting stays exact (client/dp_count.py). `num_samples`, the exact count, only checks δ and
    plans round 0 itself, before any count is released (its release's noise does not depend on n).
    """
    per_epoch = steps_per_epoch(num_samples if released_count is None else released_count, batch_size)
    return _gaussian_plan(
        n=num_samples,
        q=1.0 / per_epoch,
        steps=per_epoch * local_epochs,
        rounds=rounds,
        eps=target_epsilon,
        delta=target_delta,
        clip=max_grad_norm,
        accountant=accountant,
        stats_share=stats_share,
        unit="record",
    )


@functools.lru_cache(maxsize=256)
def plan_fedsgd(
    *,
    num_units: int,
    sample_rate: float,
    rounds: int,
    target_epsilon: float,
    target_delta: float,
    max_grad_norm: float,
    accountant: str,
    stats_share: float | None = None,
    unit: str = "record",
) -> GaussianPlan:
    """fedsgd: one noisy gradient sum per round at Poisson rate q over `num_units` records (or users)."""
    return _gaussian_plan(
        n=num_units,
        q=sample_rate,
        steps=1,
        rounds=rounds,
        eps=target_epsilon,
        delta=target_delta,
        clip=max_grad_norm,
        accountant=accountant,
        stats_share=stats_share,
        unit=unit,
    )


@functools.lru_cache(maxsize=256)
def plan_distributed(
    *,
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
    colluding_sites: int = 0,
    stats_share: float | None = None,
    feature_dim: int = 0,
    num_classes: int = 0,
) -> SkellamPlan:
    """fedsgd under distributed trust: the Skellam variance μ of the aggregate of `min_survivors` or more sites.

    μ is calibrated so that `rounds` Poisson-subsampled Skellam rounds meet the target for the aggregate; each
    site adds μ/(K_min − t), t = `colluding_sites` that may reveal their shares, so that the K_min − t honest
    shares carry μ (the accounting of μ is unchanged; only the share grows). `gamma` and `stats_gamma` are the
    integer units of the gradient sums and of the statistics (the run's SecAggConfig.quantum of their norm
    bounds; plain floats, so that a deployed site can remember the plan). With `stats_share`, round 0's
    release comes first (the feature statistics of `feature_dim` columns, or with `feature_dim` 0 the record
    counts alone; `num_classes`) as one Skellam release at rate 1
    (fedtransfer.common.privacy.fedsgd.stats_sensitivities): as for the Gaussian release, it takes `stats_share`
    of the precision 1/μ of the one release that alone meets the target, and the rounds are calibrated on what
    is left (bisection over the composed ε).
    """
    _check_delta(num_units, target_delta, unit)
    d1, d2 = skellam.sensitivities(max_grad_norm, gamma, dim)
    release: dict[str, float] = {}
    prefix: tuple[SelfComposedDpEvent, ...] = ()
    if stats_share is not None:
        s1, s2 = stats_sensitivities(feature_dim, num_classes, unit == "user", stats_gamma)
        stats_mu = skellam.calibrate_variance(1.0, 1, target_epsilon, target_delta, s1, s2) / stats_share
        release = {"stats_variance": stats_mu, "stats_l1": s1, "stats_l2": s2, "stats_quantum": stats_gamma}
        prefix = (
            skellam_steps(stats_mu, 1.0, 1, l1=s1, l2=s2, min_survivors=min_survivors, colluding_sites=colluding_sites),
        )
    mu = skellam.calibrate_variance(sample_rate, rounds, target_epsilon, target_delta, d1, d2, prefix)
    return SkellamPlan(
        noise_variance=mu,
        sample_rate=sample_rate,
        rounds=rounds,
        max_grad_norm=max_grad_norm,
        target_epsilon=target_epsilon,
        target_delta=target_delta,
        min_survivors=min_survivors,
        quantum=gamma,
        l1_sensitivity=d1,
        l2_sensitivity=d2,
        unit=unit,
        **release,
        colluding_sites=colluding_sites,
    )


def _check_delta(n: int, delta: float, unit: str) -> None:
    if delta >= 1.0 / n:
        what = "users" if unit == "user" else "training samples"
        raise ConfigError(
            f"privacy.target_delta {delta:g} must be below 1/n for this site's n {what}; lower target_delta "
            "(the message names no count: a refusal goes to the coordinator, and an exact count is private)"
        )


def _gaussian_plan(
    *,
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
) -> GaussianPlan:
    _check_delta(n, delta, unit)
    stats_sigma = None if stats_share is None else stats_noise_multiplier(eps, delta, stats_share, accountant)
    prefix = () if stats_sigma is None else (gaussian_steps(stats_sigma, 1.0, 1),)
    sigma = calibrate(prefix, q, steps * rounds, eps, delta, accountant)
    return GaussianPlan(sigma, q, steps, rounds, clip, eps, delta, accountant, stats_sigma, unit)


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
    prefix: tuple[SelfComposedDpEvent, ...],
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
        return epsilon_of([*prefix, gaussian_steps(sigma, sample_rate, steps)], target_delta, accountant)

    if epsilon_of(list(prefix), target_delta, accountant) >= target_epsilon:
        raise ConfigError(
            f"privacy.feature_stats_share (privacy.count_share without the statistics): round 0's release alone "
            f"spends more than ε = "
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


def epsilon_of(
    history: Sequence[SelfComposedDpEvent], delta: float, accountant: str, individual: bool = False
) -> float:
    """ε of a whole history of accountant events, composed by Opacus.

    A history holding Skellam rounds (distributed trust) is composed in RDP by common/privacy/skellam.py,
    Gaussian steps included; `individual` then gives ε against one site's own message.
    """
    if not history:
        return 0.0
    if not all_gaussian(history):
        return skellam.epsilon(tuple(history), delta, individual)
    # n steps of one (σ, q) then m more are n + m steps of it: merging is exact for every accountant (Opacus'
    # own accountant.step merges the same way), and keeps a long fedsgd history one PRV composition
    merged: list[tuple[float, float, int]] = []
    for sigma, q, n in to_opacus(history):
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
