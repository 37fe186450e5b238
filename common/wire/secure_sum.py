"""fedsgd under SecAgg+: each site's gradient sum as integers on Flower's grid, and the exact sum recovered.

Flower's `secaggplus_mod` multiplies a site's values by round(examples/max_weight · R)/R,
clips them to ±c, maps [−c, c] onto [0, R] with stochastic rounding and sums modulo 2^32;
the server's workflow turns the sum back into a weighted mean. A site under fedsgd
therefore sends `examples == max_weight` (ratio exactly 1) and values that already lie on
Flower's grid, x = (m − R/2)·2c/R with m = (its integer sum mod R) + ... ∈ [0, R): the
multiplication by 1 and the stochastic rounding are then the identity, and the clip never
acts (R and c powers of two make every float step exact). The server reads the integer
Σm back out of the mean and keeps Σ(integer sums) mod R, centred: post-processing of the
secure sum. A true sum outside [−R/2, R/2) wraps around and comes out wrong: a loss of
accuracy, never of privacy.
"""

from __future__ import annotations

import numpy as np


def to_grid(values: np.ndarray, gamma: float, clipping_range: float, levels: int) -> np.ndarray:
    """A site's sum in units of γ (rounded to nearest), wrapped mod `levels`, as a point of Flower's grid."""
    integers = np.rint(np.asarray(values, dtype=np.float64) / gamma)
    m = np.mod(integers + levels // 2, levels)  # in [0, levels): m − levels/2 ≡ integers (mod levels)
    return (m - levels // 2) * (2 * clipping_range / levels)


def sum_of_mean(mean: np.ndarray, sites: int, gamma: float, clipping_range: float, levels: int) -> np.ndarray:
    """The sites' summed values (times γ) from SecAgg+'s dequantised mean of `sites` grid vectors.

    The workflow computes mean = (S·2c/R − K·c)/K from S = Σm mod 2^32; S is read back,
    Σ(integers) ≡ S − K·R/2 (mod R), centred in [−R/2, R/2) and scaled by γ.
    """
    s = np.rint((np.asarray(mean, dtype=np.float64) * sites + sites * clipping_range) * levels / (2 * clipping_range))
    wrapped = np.mod(s.astype(np.int64) - sites * (levels // 2) + levels // 2, levels) - levels // 2
    return wrapped.astype(np.float64) * gamma
