"""Round 0's release of per-class record counts: under DP, the only source of a site's count (issue 23).

A run under DP without the feature statistics (privacy.feature_stats: false) still needs each site's count:
its weight in the server's mean, fedavg's Poisson sample rate, fedsgd's expected batch q·n. An exact count
breaks add/remove-one DP on its own, so round 0 releases the per-class counts instead, noised: a histogram
in which one unit (a record, or a user whose records each weigh 1/m) moves one class by 1, or several by a
total weight of 1, so its L2 sensitivity is 1, the same as one count's, and the server learns class counts
for free. Everything the site sends later that depends on its count is post-processing of this release
(client/dp_count.py).

It takes `privacy.count_share` of the budget (in the Gaussian's μ², as the statistics take
`feature_stats_share`): a count needs far less precision than class means, so its share is small (0.02 by
default: at ε = 3 the training rounds' noise grows by about 1%). Under local trust it is one Gaussian step
at rate 1; under distributed trust it is the statistics' own integer Skellam release with no feature
columns (`skellam_counts`), accounted with the statistics' sensitivity bound, which is conservative for
counts alone.
"""

from __future__ import annotations

import torch
from fedtransfer.common.config.training import PrivacyConfig
from fedtransfer.common.privacy.fedsgd import STATS_COUNTS, Units, class_statistics, skellam_statistics
from fedtransfer.common.wire.protocol import FEATURE_STATS, RECORD_COUNTS
from opacus.optimizers.optimizer import _generate_noise

COUNT_NAMES = (STATS_COUNTS,)  # the one tensor of the release: (classes,)


def round_zero_release(privacy: PrivacyConfig) -> str | None:
    """The release round 0 asks for: the feature statistics when the run has them (with or without DP), else
    under DP the record counts, else none."""
    if privacy.feature_stats:
        return FEATURE_STATS
    return RECORD_COUNTS if privacy.enabled else None


def release_counts(
    labels: torch.Tensor,
    num_classes: int,
    units: Units,
    noise_multiplier: float | None,
    generator: torch.Generator,
    secure_mode: bool = False,
) -> dict[str, torch.Tensor]:
    """The per-class counts (each record weighted 1/its unit's records), plus N(0, σ²) on each with σ
    `noise_multiplier` (sensitivity 1); exact without a noise multiplier (no DP)."""
    empty = torch.zeros(len(labels), 0, device=labels.device)
    _, counts = class_statistics(empty, labels, num_classes, units)
    if noise_multiplier is not None:
        counts = counts + _generate_noise(noise_multiplier, counts, generator, secure_mode)
    return {STATS_COUNTS: counts.cpu()}


def skellam_counts(
    labels: torch.Tensor,
    num_classes: int,
    units: Units,
    share_variance: float,
    generator: torch.Generator,
    gamma: float,
) -> dict[str, torch.Tensor]:
    """Distributed trust: the statistics' integer release with no feature columns (each unit's scaled count
    rounded in units of γ/STATS_COUNT_SCALE, summed, plus this site's Skellam share), as values."""
    empty = torch.zeros(len(labels), 0, dtype=torch.float64, device=labels.device)
    released = skellam_statistics(empty, labels, num_classes, units, share_variance, generator, gamma)
    return {STATS_COUNTS: released[STATS_COUNTS]}
