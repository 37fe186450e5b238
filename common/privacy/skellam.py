"""Distributed discrete noise for fedsgd under secure aggregation: the Skellam mechanism and its accounting.

Under `privacy.trust: distributed` each site quantises every unit's clipped gradient to
integers (γ a power of two: fedtransfer.common.config.sections.SecAggConfig.quantum), sums them and adds Skellam
noise Sk = Poisson(v/2) − Poisson(v/2) of variance v = μ/(K_min − t), t = privacy.colluding_sites (0: μ/K_min).
A sum of independent Skellams is a Skellam, so the integer sum of any K ≥ K_min sites, less any t shares the
coordinator learns, carries variance ≥ μ: the accounting of the aggregate is exactly that of one Skellam
mechanism. The noise is drawn exactly, in int64 on the CPU, on every device (`sample_integers`).

RDP of the Skellam mechanism of variance μ with integer L2 / L1 sensitivities Δ2 / Δ1
(Agarwal, Kairouz & Liu, "The Skellam Mechanism for Differentially Private Federated
Learning", NeurIPS 2021, Theorem 3.5; their reference code `_skellam_rdp` with scale 1):

    ε(α) ≤ α·Δ2²/(2μ) + min(((2α − 1)·Δ2² + 6·Δ1)/(4μ²), 3·Δ1/(2μ))      (integer α > 1)

Poisson subsampling at rate q is amplified by the general upper bound of Zhu & Wang
(ICML 2019) for integer orders; rounds compose by adding RDP; (ε, δ) comes from Opacus'
RDP conversion. Rounding each unit's scaled gradient to the nearest integer moves each
coordinate by at most 1/2, so Δ2 = C/γ + √d/2 and, for an integer vector, Δ1 = min(√d·Δ2, Δ2²).
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import torch
from fedtransfer.common.privacy.events import SelfComposedDpEvent, SkellamDpEvent, skellam_steps
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from scipy.special import gammaln, logsumexp

ORDERS = (*range(2, 65), 80, 96, 128, 192, 256)  # integer RDP orders (Zhu & Wang's bound needs integers)


def sensitivities(clip_norm: float, gamma: float, dim: int) -> tuple[float, float]:
    """(Δ1, Δ2) of the sum of units' gradients clipped to C, scaled by 1/γ and rounded to the nearest integer."""
    d2 = clip_norm / gamma + math.sqrt(dim) / 2
    return min(math.sqrt(dim) * d2, d2 * d2), d2


def rdp(alpha: int, mu: float, d1: float, d2: float) -> float:
    """RDP of order α of the Skellam mechanism of variance μ (Agarwal, Kairouz & Liu 2021, Theorem 3.5)."""
    return alpha * d2 * d2 / (2 * mu) + min(((2 * alpha - 1) * d2 * d2 + 6 * d1) / (4 * mu * mu), 3 * d1 / (2 * mu))


def subsampled_rdp(alpha: int, q: float, mu: float, d1: float, d2: float) -> float:
    """RDP of order α under Poisson subsampling at rate q: Zhu & Wang's general upper bound, or the plain RDP."""
    plain = rdp(alpha, mu, d1, d2)
    if q >= 1.0:
        return plain
    log1q = math.log1p(-q)
    terms = [0.0, rdp(2, mu, d1, d2)]
    weights = [(1 - q) ** (alpha - 1) * (alpha * q - q + 1), math.comb(alpha, 2) * q * q * (1 - q) ** (alpha - 2)]
    ls = np.arange(3, alpha + 1)
    if len(ls):
        eps_l = np.array([rdp(int(j), mu, d1, d2) for j in ls])
        log_comb = gammaln(alpha + 1) - gammaln(ls + 1) - gammaln(alpha - ls + 1)
        terms += list((ls - 1) * eps_l + log_comb + (alpha - ls) * log1q + ls * math.log(q))
        weights += [3.0] * len(ls)
    return min(plain, float(logsumexp(terms, b=weights)) / (alpha - 1))


@functools.lru_cache(maxsize=1024)
def _entry_rdp(step: SelfComposedDpEvent, individual: bool) -> tuple[float, ...]:
    """One history entry's RDP at every order: a Skellam round's (ours) or a Gaussian one's (Opacus)."""
    q, steps, m = step.sample_rate, step.count, step.mechanism
    if isinstance(m, SkellamDpEvent):
        variance = m.share if individual else m.variance  # one site's message: its share μ/(K_min − t)
        return tuple(steps * subsampled_rdp(a, q, variance, m.l1_sensitivity, m.l2_sensitivity) for a in ORDERS)
    return tuple(compute_rdp(q=q, noise_multiplier=m.noise_multiplier, steps=steps, orders=list(ORDERS)))


def epsilon(history: tuple[SelfComposedDpEvent, ...], delta: float, individual: bool = False) -> float:
    """(ε at δ) of a history that holds Skellam rounds (and maybe Gaussian steps), composed in RDP.

    `individual`: against one site's own message (variance μ/(K_min − t)) instead of the aggregate (μ).
    """
    total = np.zeros(len(ORDERS))
    for step in history:
        total += np.array(_entry_rdp(step, individual))
    with warnings.catch_warnings():  # "optimal order is the smallest/largest alpha": ε over-, never under-stated
        warnings.filterwarnings("ignore", message="Optimal order is the")
        eps, _ = get_privacy_spent(orders=list(ORDERS), rdp=total, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=256)
def calibrate_variance(
    sample_rate: float,
    steps: int,
    target_epsilon: float,
    target_delta: float,
    d1: float,
    d2: float,
    prefix: tuple[SelfComposedDpEvent, ...] = (),
) -> float:
    """The smallest variance μ (to 1% in √μ) whose `steps` subsampled Skellam rounds meet (ε, δ) for the aggregate.

    `prefix`: releases that come first (the feature statistics' Skellam release), composed in;
    ValueError when they alone spend the target.
    """

    def eps(std: float) -> float:
        return epsilon(
            (*prefix, skellam_steps(std * std, sample_rate, steps, l1=d1, l2=d2, min_survivors=1)), target_delta
        )

    if prefix and eps(1e9 * d2) > target_epsilon:
        raise ValueError(
            f"privacy.feature_stats_share (privacy.count_share without the statistics): round 0's release alone "
            f"spends more than ε = "
            f"{target_epsilon:g}; lower it"
        )
    low, high = 0.0, d2
    while eps(high) > target_epsilon:
        low, high = high, 2 * high
    while high - low > 0.01 * high:
        mid = (low + high) / 2
        low, high = (mid, high) if eps(mid) > target_epsilon else (low, mid)
    return high * high


EXACT_FLOAT = 2**53  # float64 holds every integer below this: the noisy sums stay far below (share_wrap_bound)


def sample_integers(shape: torch.Size, variance: float, generator: torch.Generator) -> torch.Tensor:
    """Skellam noise of the given variance per coordinate, as exact int64 on the CPU whatever the model's device.

    Poisson(v/2) − Poisson(v/2), drawn by numpy's Generator.poisson (Hörmann's PTRS, int64, exact for rates up
    to ~9·10^18) on a Philox stream keyed by 128 bits taken from `generator`. Why not torch.poisson on the
    model's device: CUDA's sampler returns 32-bit counts (curand_poisson), which wrap past 2^32 and would send
    noise of the wrong distribution without an error; the share must be the planned Skellam on every device.
    Keying from `generator` keeps a seeded simulation reproducible and a secure-mode CSPRNG the source of
    the randomness, on whatever device the generator lives.
    """
    words = torch.randint(0, 2**63 - 1, (2,), generator=generator, device=generator.device, dtype=torch.int64)
    high, low = (int(w) for w in words.cpu())
    rng = np.random.Generator(np.random.Philox(key=high << 64 | low))
    draws = rng.poisson(variance / 2, size=(2, *shape))  # int64 (numpy raises past its largest exact rate)
    return torch.from_numpy(draws[0] - draws[1])


def sample(shape: torch.Size, variance: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """`sample_integers`, moved to `device` as float64 (every integer below 2^53 exactly, checked)."""
    noise = sample_integers(shape, variance, generator)
    if noise.numel() and int(noise.abs().max()) >= EXACT_FLOAT:
        raise ValueError(f"Skellam noise of variance {variance:g} does not fit float64 exactly")
    return noise.to(device=device, dtype=torch.float64)


def share_wrap_bound(units: int, d2: float, share_variance: float, dim: int, modulus: int) -> float:
    """An upper bound on the chance that any coordinate of a site's noisy integer sum leaves [−Q/2, Q/2).

    The clipped, rounded sum is within units·Δ2 of 0 per coordinate; the noise's tail is
    Bernstein's (increments of ±1, variance v): P(|X| ≥ t) ≤ 2·exp(−t²/(2(v + t/3))).
    """
    t = modulus / 2 - units * d2
    if t <= 0:
        return 1.0
    return min(1.0, 2 * dim * math.exp(-t * t / (2 * (share_variance + t / 3))))
