"""The Skellam mechanism's accounting (against the paper's bound, the exact divergence and the Gaussian limit),
its sampler, the per-unit quantisation's sensitivity, and the integer sum read back through Flower's SecAgg+
arithmetic."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fedtransfer.common.config.sections import SecAggConfig
from fedtransfer.common.model.head import make_head
from fedtransfer.common.privacy import skellam
from fedtransfer.common.privacy.events import skellam_steps
from fedtransfer.common.privacy.fedsgd import Units, clipped_gradient_sum
from fedtransfer.common.wire.secure_sum import sum_of_mean, to_grid
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from opacus.accountants.analysis.rdp import compute_rdp
from opacus.accountants.utils import get_noise_multiplier
from scipy.special import logsumexp
from scipy.stats import skellam as scipy_skellam


def test_rdp_is_the_papers_bound_at_a_hand_computed_point() -> None:
    # Agarwal, Kairouz & Liu 2021, Theorem 3.5 (their reference code's _skellam_rdp, scale 1), worked by hand:
    # α = 8, μ = 10, Δ2 = 2, Δ1 = 4: 8·4/20 + min((15·4 + 24)/400, 12/20) = 1.6 + min(0.21, 0.6) = 1.81
    assert skellam.rdp(8, 10.0, 4.0, 2.0) == pytest.approx(1.81, abs=1e-12)
    # the other branch of the min: μ = 1, α = 64, Δ2 = Δ1 = 1: 32 + min((127 + 6)/4, 1.5) = 33.5
    assert skellam.rdp(64, 1.0, 1.0, 1.0) == pytest.approx(33.5, abs=1e-12)


@pytest.mark.parametrize("shift", [1, 3])
def test_rdp_bounds_the_exact_divergence_of_shifted_skellams(shift: int) -> None:
    """D_α(Sk(μ) + s ‖ Sk(μ)), summed over the support numerically, is below the bound and near it."""
    mu, k = 20.0, np.arange(-250, 251)  # beyond it the pmf underflows to 0
    log_p, log_q = scipy_skellam.logpmf(k - shift, mu / 2, mu / 2), scipy_skellam.logpmf(k, mu / 2, mu / 2)
    for alpha in (2, 4, 8, 16):
        exact = logsumexp(alpha * log_p + (1 - alpha) * log_q) / (alpha - 1)
        bound = skellam.rdp(alpha, mu, float(shift), float(shift))
        assert exact <= bound
        assert bound <= 1.7 * exact  # a bound, not a loose one


def test_large_variance_approaches_the_gaussian_of_the_same_sigma() -> None:
    sigma, d2 = 1.5, 1e5
    mu = (sigma * d2) ** 2
    orders = [2, 8, 32]
    gaussian = compute_rdp(q=1.0, noise_multiplier=sigma, steps=1, orders=orders)
    ours = [skellam.rdp(a, mu, d2 * d2, d2) for a in orders]
    assert ours == pytest.approx(list(gaussian), rel=1e-8)
    assert all(o >= g for o, g in zip(ours, gaussian, strict=True))
    # subsampled: Zhu & Wang's general bound is an upper bound on the sampled Gaussian's exact RDP
    sub = compute_rdp(q=0.3, noise_multiplier=sigma, steps=1, orders=orders)
    assert all(skellam.subsampled_rdp(a, 0.3, mu, d2 * d2, d2) >= g - 1e-9 for a, g in zip(orders, sub, strict=True))


def test_calibrated_variance_meets_the_target_like_opacus_gaussian() -> None:
    """Full batches, 30 rounds: μ for ε = 3 gives the noise multiplier Opacus gives the Gaussian, within 2%."""
    d1, d2 = skellam.sensitivities(1.0, 2.0**-10, 1290)  # 1,024 levels per unit
    mu = skellam.calibrate_variance(1.0, 30, 3.0, 1e-5, d1, d2)
    assert skellam.epsilon((skellam_steps(mu, 1.0, 30, l1=d1, l2=d2, min_survivors=1),), 1e-5) <= 3.0
    sigma = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=1.0, steps=30, accountant="rdp")
    assert math.sqrt(mu) / d2 == pytest.approx(sigma, rel=0.02)


def test_individual_epsilon_uses_one_share_and_exceeds_the_aggregates() -> None:
    step = skellam_steps(4e8, 1.0, 30, l1=1e6, l2=1080.0, min_survivors=3)
    aggregate, individual = skellam.epsilon((step,), 1e-5), skellam.epsilon((step,), 1e-5, individual=True)
    alone = skellam.epsilon((skellam_steps(4e8 / 3, 1.0, 30, l1=1e6, l2=1080.0, min_survivors=1),), 1e-5)
    assert individual == pytest.approx(alone) and individual > 1.5 * aggregate


def test_sampler_has_the_variance_and_sums_to_a_skellam() -> None:
    gen = torch.Generator().manual_seed(0)
    shares = [skellam.sample(torch.Size([200_000]), 50.0, gen, torch.device("cpu")) for _ in range(3)]
    total = sum(shares)
    assert all(torch.equal(s, s.round()) for s in shares)  # integers
    assert float(total.var()) == pytest.approx(150.0, rel=0.02)
    assert abs(float(total.mean())) < 0.1


def test_sampler_is_exact_past_32_bits() -> None:
    """CUDA's torch.poisson counts in 32 bits: at μ = 2^40 (each Poisson draw ~2^39) it would wrap."""
    mu, n = 2.0**40, 200_000
    noise = skellam.sample_integers(torch.Size([n]), mu, torch.Generator().manual_seed(1))
    assert noise.dtype == torch.int64 and noise.device.type == "cpu"
    assert float(noise.double().var()) == pytest.approx(mu, rel=0.02)
    assert abs(float(noise.double().mean())) < 5 * math.sqrt(mu / n)


def test_the_sampler_draws_on_the_cpu_whatever_device_it_is_asked_for(monkeypatch) -> None:
    def device_poisson(*_: object, **__: object) -> torch.Tensor:
        raise AssertionError("the Skellam share must not come from torch.poisson on the model's device")

    monkeypatch.setattr(torch, "poisson", device_poisson)
    integers = skellam.sample_integers(torch.Size([4, 5]), 1e6, torch.Generator().manual_seed(7))
    moved = skellam.sample(torch.Size([4, 5]), 1e6, torch.Generator().manual_seed(7), torch.device("meta"))
    assert (moved.device.type, moved.dtype, moved.shape) == ("meta", torch.float64, integers.shape)
    on_cpu = skellam.sample(torch.Size([4, 5]), 1e6, torch.Generator().manual_seed(7), torch.device("cpu"))
    assert torch.equal(on_cpu, integers.double())  # the same integers, only moved: the path has no device
    other = skellam.sample_integers(torch.Size([4, 5]), 1e6, torch.Generator().manual_seed(8))
    assert not torch.equal(other, integers)  # keyed by the site's generator: seeds differ, noise differs


def test_quantised_sum_is_integer_and_one_unit_moves_it_within_the_sensitivity() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(40, 16), torch.randint(0, 3, (40,))
    head = make_head(16, 3)
    dim = sum(p.numel() for p in head.parameters())
    gamma = SecAggConfig(quantization_range=2**27, max_weight=2048).quantum(1.0)
    d1, d2 = skellam.sensitivities(1.0, gamma, dim)

    def total(keep: torch.Tensor) -> torch.Tensor:
        out = clipped_gradient_sum(
            head, x[keep], y[keep], Units.records(int(keep.sum())), 1.0, 1.0, torch.Generator().manual_seed(1), gamma
        )
        return torch.cat([v.flatten().double() for v in out.sums.values()])

    everyone = total(torch.ones(40, dtype=torch.bool))
    assert torch.equal(everyone, everyone.round())
    for drop in range(5):
        keep = torch.ones(40, dtype=torch.bool)
        keep[drop] = False
        diff = everyone - total(keep)
        assert float(diff.norm()) <= d2 and float(diff.abs().sum()) <= d1


def test_flowers_secagg_arithmetic_gives_back_the_exact_integer_sum() -> None:
    """Grid values pass Flower's ×1, quantise, modular sum and dequantise; the sum comes back exactly, wraps and all."""
    clip, levels, gamma, sites = 8.0, 2**22, 2.0**-10, 3
    rng = np.random.default_rng(0)
    ints = [rng.integers(-(2**19), 2**19, size=(5, 7)).astype(np.float64) for _ in range(sites)]
    ints[0][0, 0], ints[1][0, 0] = 2**21 + 5, -(2**20)  # one site's value beyond R/2 wraps; the sum is still right
    masked = np.zeros((5, 7), np.int64)
    for v in ints:
        grid = to_grid(v * gamma, gamma, clip, levels).astype(np.float32)  # what the site hands to the mod
        q = quantize([grid * 1.0], clip, levels)[0]  # ratio 1: Flower multiplies by round(R)/R = 1
        masked = (masked + q) % 2**32
    mean = dequantize([masked], clip, levels)[0] - (sites - 1) * clip  # the workflow's dequantise and offset
    mean *= levels / (sites * levels)  # ... and its division by the summed ratios
    exact = sum(ints)
    assert np.array_equal(sum_of_mean(mean, sites, gamma, clip, levels), exact * gamma)
