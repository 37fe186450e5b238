"""DP-FedSGD at a site, and the DP feature statistics: what a site computes and releases under fedsgd.

One round: sample each unit (a record, or a user with all their records) independently
with probability q, take each sampled unit's gradient of the summed loss at the server's
head (a user's gradient is the sum over their records), clip it to L2 norm C, sum, add
Gaussian noise N(0, σ²C²) per coordinate. What leaves the site is that noisy sum, named
like the head's tensors: nothing in it, nor beside it, depends on the realised batch; the
server divides by the public expected batch size q·n (server/federation/strategy.py).

The clipped sum and the noise are separate steps on purpose: with distributed noise under
secure aggregation (privacy.trust: distributed) a site quantises each unit's clipped gradient
to integers and adds only its share of discrete Skellam noise (common/privacy/skellam.py).

The statistics release: per-class sums of the unit-normalised features and per-class counts,
one Gaussian mechanism. A record moves one class sum by at most 1 and one count by 1; a
user's records are each weighted 1/m (m: the user's records), which bounds a user's move the
same way. Sums get noise σ_a = σ·√(10/9), counts 3σ_a: the whitened sensitivity is then
√(1/σ_a² + 1/(3σ_a)²) = 1/σ, one step at sample rate 1 with noise multiplier σ.

Like common/privacy/dp_sgd.py it lives in common/: the site and the auditor's canary test run it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from fedtransfer.common.privacy import skellam
from opacus.optimizers.optimizer import _generate_noise
from torch import nn
from torch.func import functional_call, grad, vmap

STATS_SUMS = "stats.class-sums"  # (classes, feature_dim)
STATS_COUNTS = "stats.class-counts"  # (classes,)
STATS_NAMES = (STATS_SUMS, STATS_COUNTS)
COUNT_NOISE_FACTOR = 3.0  # counts get 3x the noise of the sums: the mean needs the sums more
# distributed trust: a count enters the integer release as 1/4 of a record (exact on γ's grid), so with one
# Skellam variance per coordinate the counts get 4x the sums' noise (in records); see stats_sensitivities
STATS_COUNT_SCALE = 0.25
STATS_NORM = math.sqrt(1 + STATS_COUNT_SCALE**2)  # one unit's (sums, scaled counts) move in L2, before rounding
CHUNK_RECORDS = 512  # per-sample gradients are computed this many records at a time (memory)


@dataclass(frozen=True)
class Units:
    """Who a sampling unit is: each record's unit index (0..count-1). Records: each its own unit."""

    of_record: torch.Tensor  # int64 (records,)
    count: int

    @staticmethod
    def records(n: int) -> Units:
        return Units(torch.arange(n), n)

    @staticmethod
    def of_users(user_ids: torch.Tensor) -> Units:
        """Units from any per-record user ids (the same id: the same person)."""
        _, index = torch.unique(user_ids, return_inverse=True)
        return Units(index.long(), int(index.max().item()) + 1 if len(index) else 0)

    def weights(self) -> torch.Tensor:
        """Each record's weight 1/m, m its unit's records: a unit's total weight is 1."""
        sizes = torch.bincount(self.of_record, minlength=self.count).float()
        return 1.0 / sizes[self.of_record]


def synthetic_users(num_records: int, per_user: int, seed: int) -> torch.Tensor:
    """A deterministic grouping of records into users of `per_user` records each (demo data has no people)."""
    order = torch.randperm(num_records, generator=torch.Generator().manual_seed(seed))
    users = torch.empty(num_records, dtype=torch.long)
    users[order] = torch.arange(num_records) // per_user
    return users


def user_seed(config_seed: int, site_name: str) -> int:
    """The synthetic grouping's seed: the config's and the site's name, so the site and the auditor agree."""
    return int.from_bytes(hashlib.sha256(f"{config_seed}|{site_name}|users".encode()).digest()[:8], "big") >> 1


def make_generator(seed: int, secure_mode: bool, device: torch.device) -> torch.Generator:
    """Sampling and noise randomness: seeded (reproducible simulations), or a CSPRNG in secure mode."""
    if secure_mode:
        import torchcsprng  # checked by fedtransfer.common.privacy.calibration.require_secure_rng before any training

        return torchcsprng.create_random_device_generator("/dev/urandom")
    return torch.Generator(device=device).manual_seed(seed)


@dataclass(frozen=True)
class ClippedSum:
    """A round's sum of clipped per-unit gradients; `loss` and `sampled` stay at the site."""

    sums: dict[str, torch.Tensor]  # by head state name; buffers (no gradient) are zero
    loss: float
    sampled: int


def clipped_gradient_sum(
    head: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    units: Units,
    sample_rate: float,
    clip_norm: float | None,
    generator: torch.Generator,
    quantum: float | None = None,
) -> ClippedSum:
    """Poisson-sample units at `sample_rate`, clip each unit's gradient to `clip_norm` (None: no clipping), sum.

    With `quantum` γ (distributed trust) each unit's clipped gradient is divided by γ and
    rounded to the nearest integer before the sum: the sum is then integer-valued (float64,
    exact) and one unit moves it by at most C/γ + √d/2 in L2 (common/privacy/skellam.py).
    """
    device = features.device
    chosen = torch.rand(units.count, generator=generator, device=generator.device).to(device) < sample_rate
    keep = chosen[units.of_record.to(device)]
    idx = torch.nonzero(keep).squeeze(1)
    idx = idx[torch.argsort(units.of_record.to(device)[idx], stable=True)]  # a unit's records together
    params = {k: v.detach() for k, v in head.named_parameters()}
    if units.count == len(units.of_record) and _is_linear_probe(head):
        total, loss_sum = _linear_probe_sum(head, features[idx], labels[idx], clip_norm, quantum)
        return ClippedSum(_unflatten(head, params, total), loss_sum / max(len(idx), 1), len(idx))
    dtype = torch.float32 if quantum is None else torch.float64
    total = torch.zeros(sum(p.numel() for p in params.values()), device=device, dtype=dtype)
    loss_sum = 0.0
    for part in _unit_chunks(units.of_record.to(device)[idx]):
        rows = idx[part]
        flat, losses = _per_sample_gradients(head, params, features[rows], labels[rows])
        _, local = torch.unique_consecutive(units.of_record.to(device)[rows], return_inverse=True)
        per_unit = torch.zeros(int(local.max()) + 1, flat.shape[1], device=device).index_add_(0, local, flat)
        if quantum is not None:  # float64, and a hair inside C, so that float error cannot push a norm past C
            per_unit, bound = per_unit.double(), None if clip_norm is None else clip_norm * (1 - 1e-9)
        else:
            bound = clip_norm
        if bound is not None:
            per_unit = per_unit * (bound / (per_unit.norm(dim=1, keepdim=True) + 1e-12)).clamp(max=1.0)
        if quantum is not None:
            per_unit = torch.round(per_unit / quantum)  # γ a power of two: the division is exact
        total += per_unit.sum(0)
        loss_sum += float(losses.sum())
    sums = _unflatten(head, params, total)
    return ClippedSum(sums, loss_sum / max(len(idx), 1), len(idx))


def _is_linear_probe(head: nn.Module) -> bool:
    """A head whose only parameters are its last layer's, a Linear (with bias): the closed form applies."""
    last = list(head.children())[-1] if isinstance(head, nn.Sequential) else None
    return isinstance(last, nn.Linear) and last.bias is not None and sum(1 for _ in head.parameters()) == 2


@torch.no_grad()
def _linear_probe_sum(
    head: nn.Sequential, x: torch.Tensor, y: torch.Tensor, clip_norm: float | None, quantum: float | None = None
) -> tuple[torch.Tensor, float]:
    """Closed form for softmax regression on z = head[:-1](x): a record's gradient is (p − e_y) zᵀ for the
    weights and p − e_y for the bias, of norm ‖p − e_y‖·√(‖z‖² + 1); the clipped sum is one matrix product.

    With `quantum` γ each record's clipped gradient is built (in float64, CHUNK_RECORDS at a time, a hair
    inside C as in clipped_gradient_sum) and rounded in units of γ before the sum.
    """
    z = head[:-1](x)
    logits = head[-1](z)
    residual = logits.softmax(1) - nn.functional.one_hot(y, logits.shape[1]).to(logits.dtype)
    loss = float(nn.functional.cross_entropy(logits, y, reduction="sum")) if len(y) else 0.0
    if quantum is not None:
        residual, z = residual.double(), z.double()
    scale = torch.ones(len(y), device=x.device, dtype=residual.dtype)
    if clip_norm is not None:
        bound = clip_norm if quantum is None else clip_norm * (1 - 1e-9)
        norms = residual.norm(dim=1) * (z.square().sum(1) + 1).sqrt()
        scale = (bound / (norms + 1e-12)).clamp(max=1.0)
    weighted = residual * scale[:, None]
    if quantum is None:
        return torch.cat([(weighted.T @ z).flatten(), weighted.sum(0)]), loss
    total = torch.zeros(weighted.shape[1] * (z.shape[1] + 1), dtype=torch.float64, device=x.device)
    for at in range(0, len(y), CHUNK_RECORDS):
        r, zc = weighted[at : at + CHUNK_RECORDS], z[at : at + CHUNK_RECORDS]
        per_record = torch.cat([(r[:, :, None] * zc[:, None, :]).flatten(1), r], dim=1)
        total += torch.round(per_record / quantum).sum(0)
    return total, loss


def _unit_chunks(unit_of_row: torch.Tensor) -> list[torch.Tensor]:
    """Index ranges over rows sorted by unit, about CHUNK_RECORDS rows each, never splitting a unit."""
    if len(unit_of_row) == 0:
        return []
    starts = [0, *(torch.nonzero(unit_of_row[1:] != unit_of_row[:-1]).squeeze(1) + 1).tolist()]
    chunks, begin = [], 0
    for start in [*starts[1:], len(unit_of_row)]:
        if start - begin >= CHUNK_RECORDS:
            chunks.append(torch.arange(begin, start))
            begin = start
    if begin < len(unit_of_row):
        chunks.append(torch.arange(begin, len(unit_of_row)))
    return chunks


def _per_sample_gradients(
    head: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each record's gradient of its own cross-entropy, flattened (records, parameters), and the losses."""
    buffers = {k: v.detach() for k, v in head.named_buffers()}

    def loss_of(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logits = functional_call(head, (p, buffers), (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, yi.unsqueeze(0))

    grads = vmap(grad(loss_of), in_dims=(None, 0, 0))(params, x, y)
    with torch.no_grad():
        logits = functional_call(head, (params, buffers), (x,))
        losses = nn.functional.cross_entropy(logits, y, reduction="none")
    return torch.cat([grads[k].reshape(len(x), -1) for k in params], dim=1), losses


def _unflatten(head: nn.Module, params: dict[str, torch.Tensor], flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """A flat parameter vector as the head's state: every state name, buffers as zeros."""
    out, at = {}, 0
    for name, p in params.items():
        out[name] = flat[at : at + p.numel()].reshape(p.shape)
        at += p.numel()
    return {k: out[k] if k in out else torch.zeros_like(v) for k, v in head.state_dict().items()}


def add_noise(
    sums: dict[str, torch.Tensor],
    std: float,
    generator: torch.Generator,
    secure_mode: bool = False,
    skip: frozenset[str] = frozenset(),
) -> dict[str, torch.Tensor]:
    """Gaussian noise of standard deviation `std` on every tensor (Opacus' own noise routine), except `skip`."""
    if std == 0:
        return dict(sums)
    return {k: v if k in skip else v + _generate_noise(std, v, generator, secure_mode) for k, v in sums.items()}


def class_statistics(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, units: Units
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums of unit-normalised features and per-class counts, each record weighted 1/(its unit's records)."""
    w = units.weights().to(features.device)
    unit = nn.functional.normalize(features.float(), dim=1) * w[:, None]
    sums = torch.zeros(num_classes, features.shape[1], device=features.device).index_add_(0, labels, unit)
    counts = torch.zeros(num_classes, device=features.device).index_add_(0, labels, w)
    return sums, counts


def release_statistics(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    units: Units,
    noise_multiplier: float | None,
    generator: torch.Generator,
    secure_mode: bool = False,
) -> dict[str, torch.Tensor]:
    """The statistics as released: with `noise_multiplier` σ, sums + N(0, (σ√(10/9))²), counts 3× that noise."""
    sums, counts = class_statistics(features, labels, num_classes, units)
    if noise_multiplier is not None:
        sum_std = noise_multiplier * math.sqrt(1 + 1 / COUNT_NOISE_FACTOR**2)
        sums = sums + _generate_noise(sum_std, sums, generator, secure_mode)
        counts = counts + _generate_noise(COUNT_NOISE_FACTOR * sum_std, counts, generator, secure_mode)
    return {STATS_SUMS: sums.cpu(), STATS_COUNTS: counts.cpu()}


def stats_quanta(gamma: float) -> dict[str, float]:
    """The unit of each released tensor on SecAgg+'s grid: γ (SecAggConfig.quantum(STATS_NORM)) for the sums,
    γ/s for the counts."""
    return {STATS_SUMS: gamma, STATS_COUNTS: gamma / STATS_COUNT_SCALE}


def stats_sensitivities(feature_dim: int, num_classes: int, per_user: bool, gamma: float) -> tuple[float, float]:
    """(Δ1, Δ2) of the integer statistics release under distributed trust, in units of γ (the run's
    SecAggConfig.quantum(STATS_NORM)).

    Neighbouring datasets differ by one unit (a record, or all of a user's records). Each unit's
    contribution is rounded on its own: v = ⊕_k (Σ_{i: y_i = k} w_i·u_i, s·Σ_{i: y_i = k} w_i) over
    the classes k, with ‖u_i‖ = 1, w_i = 1/m (m the unit's records, so Σ w_i = 1) and count scale
    s = STATS_COUNT_SCALE. By the triangle inequality ‖v‖ ≤ Σ_i w_i·‖(u_i, s)‖ = √(1 + s²) = STATS_NORM,
    whatever classes a user's records fall in. Dividing by γ and rounding each coordinate moves it by
    at most 1/2, and a zero coordinate stays zero: at most D coordinates move, D = F + 1 for a record
    (its class's sum row and count), C·(F + 1) for a user (every class). The other units' rounded
    vectors do not change, so the sum moves by exactly this unit's: Δ2 ≤ STATS_NORM/γ + √D/2, and for
    an integer vector with D nonzeros Δ1 ≤ min(√D·Δ2, Δ2²) (fedtransfer.common.privacy.skellam.sensitivities).
    """
    touched = (feature_dim + 1) * (num_classes if per_user else 1)
    return skellam.sensitivities(STATS_NORM, gamma, touched)


def skellam_statistics(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    units: Units,
    share_variance: float,
    generator: torch.Generator,
    gamma: float,
) -> dict[str, torch.Tensor]:
    """Distributed trust's release: each unit's (sums, s·counts) in units of γ (SecAggConfig.quantum(STATS_NORM)),
    rounded, summed, plus this site's Skellam share on every coordinate; returned as values (integers × each
    tensor's quantum), float64."""
    quanta = stats_quanta(gamma)
    w = units.weights().to(features.device).double()
    unit = nn.functional.normalize(features.double(), dim=1) * (w * (1 - 1e-9))[:, None]  # float error stays inside
    cells, at = torch.unique(units.of_record.to(features.device) * num_classes + labels, return_inverse=True)
    rows = torch.zeros(len(cells), features.shape[1], dtype=torch.float64, device=features.device)
    rows = torch.round(rows.index_add_(0, at, unit) / gamma)  # one unit's part of one class, rounded
    counts = torch.zeros(len(cells), dtype=torch.float64, device=features.device).index_add_(0, at, w)
    counts = torch.round(counts * STATS_COUNT_SCALE / gamma)
    cls = cells % num_classes
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64, device=features.device)
    per_class = torch.zeros(num_classes, dtype=torch.float64, device=features.device)
    totals = {STATS_SUMS: sums.index_add_(0, cls, rows), STATS_COUNTS: per_class.index_add_(0, cls, counts)}
    return {
        k: ((v + skellam.sample(v.shape, share_variance, generator, v.device)) * quanta[k]).cpu()
        for k, v in totals.items()
    }


def whitened_sensitivity(noise_multiplier: float) -> float:
    """μ of the statistics release: sums (sensitivity 1) and counts (1) with their noise, whitened."""
    sum_std = noise_multiplier * math.sqrt(1 + 1 / COUNT_NOISE_FACTOR**2)
    return math.sqrt(1 / sum_std**2 + 1 / (COUNT_NOISE_FACTOR * sum_std) ** 2)


@torch.no_grad()
def start_from_statistics(head: nn.Sequential, sums: torch.Tensor, counts: torch.Tensor) -> None:
    """Centre a centred head on the released global mean; a linear head starts at the centred class means.

    Class k's weights become the unit direction of (its DP class mean − the global mean): on
    centred, normalised features that is a nearest-class-mean (cosine) classifier, a start that
    the DP gradient steps refine. Noisy counts are clamped at 1. Post-processing of the release.
    """
    centre, last = head[0], head[-1]
    if not isinstance(centre, nn.Module) or not hasattr(centre, "mean"):
        raise ValueError("the head is not centred (make_head(centred=True))")
    total = counts.sum().clamp(min=1.0)
    mean = sums.sum(0) / total
    centre.mean.copy_(mean)
    if len(head) == 3 and isinstance(last, nn.Linear):  # Centre, L2Normalize, Linear: the linear probe
        class_means = sums / counts.clamp(min=1.0)[:, None]
        last.weight.copy_(nn.functional.normalize(class_means - mean, dim=1))
        last.bias.zero_()
