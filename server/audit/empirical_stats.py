"""Empirical lower bound on epsilon from a single training run.

Implements the one-run audit of Steinke, Nasr & Jagielski, "Privacy Auditing
with One (1) Training Run" (NeurIPS 2023, arXiv:2305.08846). Each of m canaries
is included in training independently with probability 1/2. Afterwards an
attacker guesses "in" or "out" for r of them (abstaining on the rest) and is
right v times. Under (eps, delta)-DP the number of correct guesses is
stochastically dominated by Binomial(r, e^eps / (1 + e^eps)) up to a delta term
(their main theorem, general (eps, delta) form), so a large v is unlikely for
small eps. The largest eps at which the observation has p-value below
beta = 1 - confidence is a lower bound on the true eps that holds with
probability at least `confidence`. Only one training run is needed because the
m canaries are independent coin flips, not m separate trainings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import expit
from scipy.stats import binom

# Bisection stops when the bracket is this narrow; far below any meaningful eps.
_EPS_TOLERANCE = 1e-9


@dataclass(frozen=True)
class AuditResult:
    """The best bound over the guess counts tried, and where it came from.

    `confidence` is the family-wise level of `eps_lower_bound`, i.e. after the
    Bonferroni correction over all guess counts tried.
    """

    eps_lower_bound: float
    num_canaries: int
    best_k: int
    num_guesses: int
    num_correct: int
    confidence: float


def p_value(num_canaries: int, num_guesses: int, num_correct: int, epsilon: float, delta: float) -> float:
    """Upper bound on P[at least v correct out of r guesses] for an (eps, delta)-DP run.

    This is the tail bound of Steinke et al.'s main theorem, computed as in
    their Appendix D reference code:
        p = P[B >= v] + 2 m delta * max_{1<=i<=m} P[v > B >= v - i] / i,
    with B ~ Binomial(r, q), q = e^eps / (1 + e^eps). The window probability
    stops growing at i = v (B >= 0), so the maximum is attained at some i <= v.
    """
    _check_counts(num_canaries, num_guesses, num_correct)
    m, r, v = num_canaries, num_guesses, num_correct
    q = float(expit(epsilon))
    tail = float(binom.sf(v - 1, r, q))
    if v == 0 or delta == 0:
        return min(1.0, tail)
    windows = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))  # i = 1..v
    alpha = float(np.max(windows / np.arange(1, v + 1)))
    return min(1.0, tail + 2 * m * delta * alpha)


def epsilon_lower_bound(
    num_canaries: int,
    num_guesses: int,
    num_correct: int,
    delta: float,
    confidence: float = 0.95,
) -> float:
    """Largest eps (to ~1e-9) that the audit rejects at level 1 - confidence.

    Returns 0.0 when even eps = 0 cannot be rejected. The returned eps always
    satisfies p_value(eps) < 1 - confidence, which is what makes it a valid
    lower bound: an (eps0, delta)-DP run is also (eps, delta)-DP for every
    eps >= eps0, so rejecting some eps >= eps0 has probability below beta.
    `num_canaries` counts every canary that was randomised, including those the
    attacker abstained on; it only matters when delta > 0.
    """
    _check_counts(num_canaries, num_guesses, num_correct)
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    beta = 1.0 - confidence

    def rejected(epsilon: float) -> bool:
        return p_value(num_canaries, num_guesses, num_correct, epsilon, delta) < beta

    if not rejected(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while rejected(high):  # ends: at eps ~ 40, q == 1.0 in floats and p == 1
        low, high = high, 2.0 * high
    while high - low > _EPS_TOLERANCE:
        middle = (low + high) / 2.0
        if rejected(middle):
            low = middle
        else:
            high = middle
    return low


def audit_from_scores(
    scores: np.ndarray,
    included: np.ndarray,
    delta: float,
    confidence: float = 0.95,
    *,
    guess_counts: Sequence[int],
) -> AuditResult:
    """Audit from per-canary membership scores (higher = more likely included).

    For each k in `guess_counts` the attacker guesses "in" for the k highest
    scores and "out" for the k lowest (r = 2k guesses, abstaining on the rest);
    the best bound over k is returned. Picking k after seeing the results is a
    multiple comparison, so each k is tested at level (1 - confidence) / K for
    K distinct k values (Bonferroni); the returned bound then holds with
    probability `confidence`. Fix K small (a handful of k values) to keep the
    correction cheap. Ties in score are broken by canary index, which does not
    depend on inclusion, so they do not bias the guesses.
    """
    scores = np.asarray(scores, dtype=float)
    included = np.asarray(included)
    if scores.ndim != 1 or scores.shape != included.shape:
        raise ValueError("scores and included must be 1-D arrays of the same length")
    if included.dtype != np.bool_:
        raise TypeError(f"included must be a bool array, got dtype {included.dtype}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN, which has no rank")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    num_canaries = len(scores)
    ks = sorted({int(k) for k in guess_counts})
    if not ks:
        raise ValueError("guess_counts must name at least one k")
    if ks[0] < 1 or 2 * ks[-1] > num_canaries:
        raise ValueError(f"each k must satisfy 1 <= k <= m/2 = {num_canaries / 2}, got {ks}")
    per_test_confidence = 1.0 - (1.0 - confidence) / len(ks)

    ranked = included[np.argsort(-scores, kind="stable")]  # highest score first

    def audit(k: int) -> AuditResult:
        correct = int(ranked[:k].sum()) + int((~ranked[num_canaries - k :]).sum())
        bound = epsilon_lower_bound(num_canaries, 2 * k, correct, delta, per_test_confidence)
        return AuditResult(bound, num_canaries, k, 2 * k, correct, confidence)

    return max((audit(k) for k in ks), key=lambda result: result.eps_lower_bound)


def _check_counts(num_canaries: int, num_guesses: int, num_correct: int) -> None:
    if not 0 <= num_correct <= num_guesses <= num_canaries:
        raise ValueError(
            "need 0 <= num_correct <= num_guesses <= num_canaries, got "
            f"v={num_correct}, r={num_guesses}, m={num_canaries}"
        )
