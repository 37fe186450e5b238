"""What a site spent, as typed events: the accountant's history (as dp-accounting's DpEvents, without its dependency).

A history is a list of `SelfComposedDpEvent(PoissonSampledDpEvent(q, mechanism), count)`: `count` steps, each one
Poisson-subsampled at rate q, of a Gaussian or a Skellam mechanism. The accounting
(`fedtransfer.common.privacy.calibration.epsilon_of`) reads the mechanism's type, not a tag inside a tuple. On disk
(the ledger) each event keeps the list it had before events existed, `[σ, q, n]` or `["skellam", μ, q, n, Δ1, Δ2,
K_min]` (then t, privacy.colluding_sites, when it is not 0) (`to_json`, `from_json`), so ledgers already on sites'
disks load.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

SKELLAM_TAG = "skellam"  # first element of a Skellam event as the ledger writes it


@dataclass(frozen=True)
class GaussianDpEvent:
    """Gaussian noise of standard deviation `noise_multiplier` × the clipping norm."""

    noise_multiplier: float


@dataclass(frozen=True)
class SkellamDpEvent:
    """Skellam noise of variance `variance` μ on the aggregate of at least `min_survivors` sites' integer sums.

    The sensitivities are the integer ones (common/privacy/skellam.py). `colluding_sites` t of the survivors may
    reveal their shares, so each site adds μ/(K_min − t): one site's own message carries that (`share`).
    """

    variance: float
    l1_sensitivity: float
    l2_sensitivity: float
    min_survivors: int
    colluding_sites: int = 0

    @property
    def share(self) -> float:
        """The variance one site adds: μ/(K_min − t)."""
        return self.variance / (self.min_survivors - self.colluding_sites)


@dataclass(frozen=True)
class PoissonSampledDpEvent:
    """`event` run on a Poisson sample of the units at rate `sampling_probability`."""

    sampling_probability: float
    event: GaussianDpEvent | SkellamDpEvent


@dataclass(frozen=True)
class SelfComposedDpEvent:
    """`event` repeated `count` times: the entry of an accountant history."""

    event: PoissonSampledDpEvent
    count: int

    @property
    def mechanism(self) -> GaussianDpEvent | SkellamDpEvent:
        return self.event.event

    @property
    def sample_rate(self) -> float:
        return self.event.sampling_probability


History = list[SelfComposedDpEvent]


def gaussian_steps(noise_multiplier: float, sample_rate: float, steps: int) -> SelfComposedDpEvent:
    """`steps` Poisson-subsampled Gaussian steps: what Opacus' accountant keeps as (σ, q, steps)."""
    return SelfComposedDpEvent(PoissonSampledDpEvent(sample_rate, GaussianDpEvent(noise_multiplier)), steps)


def skellam_steps(
    variance: float,
    sample_rate: float,
    steps: int,
    *,
    l1: float,
    l2: float,
    min_survivors: int,
    colluding_sites: int = 0,
) -> SelfComposedDpEvent:
    """`steps` Poisson-subsampled Skellam rounds of the aggregate's variance μ."""
    return SelfComposedDpEvent(
        PoissonSampledDpEvent(sample_rate, SkellamDpEvent(variance, l1, l2, min_survivors, colluding_sites)), steps
    )


def all_gaussian(history: Iterable[SelfComposedDpEvent]) -> bool:
    """Whether Opacus' own accountants (RDP, PRV) can compose this history: they know only the Gaussian."""
    return all(isinstance(e.mechanism, GaussianDpEvent) for e in history)


def to_opacus(history: Iterable[SelfComposedDpEvent]) -> list[tuple[float, float, int]]:
    """Opacus' accountant history, (σ, q, steps) per entry; ValueError for a Skellam event (Opacus cannot)."""
    out = []
    for e in history:
        if not isinstance(e.mechanism, GaussianDpEvent):
            raise ValueError("Opacus' accountants compose Gaussian steps only; this history holds Skellam rounds")
        out.append((float(e.mechanism.noise_multiplier), float(e.sample_rate), int(e.count)))
    return out


def from_opacus(history: Iterable[Sequence[Any]]) -> History:
    return [gaussian_steps(float(sigma), float(q), int(n)) for sigma, q, n in history]


def to_json(e: SelfComposedDpEvent) -> list[Any]:
    """The ledger's list for one event, as ledgers were written before events existed."""
    m = e.mechanism
    if isinstance(m, SkellamDpEvent):
        out = [SKELLAM_TAG, m.variance, e.sample_rate, e.count, m.l1_sensitivity, m.l2_sensitivity, m.min_survivors]
        return [*out, m.colluding_sites] if m.colluding_sites else out  # t = 0: the list ledgers always had
    return [m.noise_multiplier, e.sample_rate, e.count]


def from_json(raw: Sequence[Any]) -> SelfComposedDpEvent:
    """One ledger list back as an event; ValueError for a list of neither shape."""
    if len(raw) in (7, 8) and raw[0] == SKELLAM_TAG:
        _, mu, q, n, d1, d2, k_min, *t = raw
        return skellam_steps(
            float(mu),
            float(q),
            int(n),
            l1=float(d1),
            l2=float(d2),
            min_survivors=int(k_min),
            colluding_sites=int(t[0]) if t else 0,
        )
    if len(raw) == 3 and not isinstance(raw[0], str):
        sigma, q, n = raw
        return gaussian_steps(float(sigma), float(q), int(n))
    raise ValueError(f"not an accountant history entry: {list(raw)!r:.80}")
