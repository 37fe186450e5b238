"""Tests for the one-run privacy audit bound (Steinke, Nasr & Jagielski 2023)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from fedtransfer.server.audit.empirical_stats import (
    AuditResult,
    audit_from_scores,
    epsilon_lower_bound,
    p_value,
)
from hypothesis import given, settings
from hypothesis import strategies as st


def _reference_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The theorem's bound written out literally: exact sums, max over all i in [m]."""
    q = math.exp(eps) / (1 + math.exp(eps))

    def pmf(j: int) -> float:
        return math.comb(r, j) * q**j * (1 - q) ** (r - j)

    tail = sum(pmf(j) for j in range(v, r + 1))
    alpha = max(sum(pmf(j) for j in range(max(v - i, 0), v)) / i for i in range(1, m + 1))
    return min(1.0, tail + 2 * m * delta * alpha)


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, 60),
    data=st.data(),
    eps=st.floats(0, 6),
    delta=st.sampled_from([0.0, 1e-6, 1e-3, 0.02]),
)
def test_p_value_matches_literal_theorem(m, data, eps, delta):
    r = data.draw(st.integers(0, m))
    v = data.draw(st.integers(0, r))
    assert p_value(m, r, v, eps, delta) == pytest.approx(_reference_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-12)


def test_bound_is_the_rejection_threshold():
    m, r, v, delta, beta = 1000, 400, 300, 1e-5, 0.05
    eps = epsilon_lower_bound(m, r, v, delta, 1 - beta)
    assert eps > 0
    assert p_value(m, r, v, eps, delta) < beta <= p_value(m, r, v, eps + 1e-6, delta)


@pytest.mark.parametrize("delta", [0.0, 1e-5])
def test_chance_level_guessing_gives_zero(delta):
    assert epsilon_lower_bound(1000, 1000, 500, delta) == 0.0
    assert epsilon_lower_bound(1000, 1000, 520, delta) == 0.0  # z ~ 1.26 < 1.645
    assert epsilon_lower_bound(1000, 1000, 100, delta) == 0.0  # worse than chance
    assert epsilon_lower_bound(1000, 0, 0, delta) == 0.0  # abstained everywhere


@pytest.mark.parametrize("delta", [0.0, 1e-6])
def test_all_correct_bound_is_large_and_grows_with_r(delta):
    bounds = [epsilon_lower_bound(10**5, r, r, delta) for r in (10, 100, 1000, 10_000)]
    assert all(a < b for a, b in itertools.pairwise(bounds))
    # delta = 0 has a closed form: q^r = beta.
    if delta == 0:
        assert bounds[2] == pytest.approx(-math.log(0.05 ** (-1 / 1000) - 1), abs=1e-6)
    assert bounds[2] > 5


def test_delta_term_weakens_the_bound():
    by_delta = [epsilon_lower_bound(1000, 1000, 1000, d) for d in (0, 1e-6, 1e-4, 1e-2, 0.1)]
    assert all(a > b for a, b in itertools.pairwise(by_delta))
    assert by_delta[-1] == 0.0
    # 2 m delta: every randomised canary costs delta, abstentions included.
    by_m = [epsilon_lower_bound(m, 100, 100, 1e-5) for m in (100, 10**4, 10**6)]
    assert by_m[0] > by_m[1] > by_m[2] == 0.0


def test_more_confidence_gives_smaller_bound():
    bounds = [epsilon_lower_bound(1000, 500, 450, 1e-6, c) for c in (0.5, 0.9, 0.95, 0.999)]
    assert all(a > b for a, b in itertools.pairwise(bounds))


@settings(max_examples=80, deadline=None)
@given(
    r=st.integers(1, 300),
    data=st.data(),
    delta=st.sampled_from([0.0, 1e-6, 1e-4]),
)
def test_bound_monotone_in_correct_guesses(r, data, delta):
    v1 = data.draw(st.integers(0, r))
    v2 = data.draw(st.integers(v1, r))
    m = r + data.draw(st.integers(0, 200))
    assert epsilon_lower_bound(m, r, v1, delta) <= epsilon_lower_bound(m, r, v2, delta) + 1e-8


@settings(max_examples=80, deadline=None)
@given(
    r=st.integers(1, 100_000),
    frac=st.floats(0.5, 0.999),
    confidence=st.floats(0.5, 0.999),
)
def test_pure_dp_bound_never_exceeds_empirical_logit(r, frac, confidence):
    """With delta = 0, at v/r = p the p-value is >= 1/2 (median of a binomial), so
    the bound stays below log(p / (1 - p)), the eps of randomized response."""
    v = max(math.ceil(frac * r), 1)
    p = v / r
    bound = epsilon_lower_bound(r, r, v, 0.0, confidence)
    assert bound >= 0
    if p == 0.5:
        assert bound == 0.0
    elif p < 1:
        assert bound < math.log(p / (1 - p))


@pytest.mark.parametrize("p", [0.6, 0.75, 0.9, 0.99])
def test_pure_dp_bound_approaches_logit_as_canaries_grow(p):
    limit = math.log(p / (1 - p))
    gaps = [limit - epsilon_lower_bound(r, r, round(p * r), 0.0) for r in (10**3, 10**4, 10**6)]
    assert all(g > 0 for g in gaps)
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 0.02 * max(1.0, limit)


@pytest.mark.parametrize(
    "args",
    [
        (10, 5, 6, 0.0, 0.95),
        (10, 11, 5, 0.0, 0.95),
        (10, 5, -1, 0.0, 0.95),
        (10, 5, 3, -0.1, 0.95),
        (10, 5, 3, 1.5, 0.95),
        (10, 5, 3, 0.0, 1.0),
        (10, 5, 3, 0.0, 0.0),
    ],
)
def test_invalid_arguments_rejected(args):
    with pytest.raises(ValueError):
        epsilon_lower_bound(*args)


def test_audit_counts_top_in_and_bottom_out():
    scores = np.array([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0])
    included = np.array([True, False, True, True, False, True, False, False])
    result = audit_from_scores(scores, included, 1e-5, guess_counts=[2])
    # top 2 -> guess in: one right; bottom 2 -> guess out: both right.
    assert (result.best_k, result.num_guesses, result.num_correct) == (2, 4, 3)
    assert result.num_canaries == 8 and result.confidence == 0.95


def test_audit_separable_scores_picks_largest_k_with_bonferroni():
    rng = np.random.default_rng(0)
    included = rng.random(2000) < 0.5
    scores = included + rng.normal(0, 0.01, 2000)  # perfectly separable
    ks = [10, 100, 300, 600]
    assert min(included.sum(), (~included).sum()) >= 600  # every guess can be right
    result = audit_from_scores(scores, included, 1e-6, 0.95, guess_counts=ks)
    assert (result.best_k, result.num_guesses, result.num_correct) == (600, 1200, 1200)
    corrected = epsilon_lower_bound(2000, 1200, 1200, 1e-6, 1 - 0.05 / len(ks))
    uncorrected = epsilon_lower_bound(2000, 1200, 1200, 1e-6)
    assert result.eps_lower_bound == corrected < uncorrected


def test_audit_random_scores_give_near_zero_bound():
    rng = np.random.default_rng(1)
    included = rng.random(5000) < 0.5
    scores = rng.normal(size=5000)  # independent of inclusion
    result = audit_from_scores(scores, included, 1e-5, guess_counts=[50, 500, 2500])
    assert isinstance(result, AuditResult)
    assert result.eps_lower_bound < 0.1


def test_audit_duplicate_k_values_do_not_inflate_correction():
    rng = np.random.default_rng(2)
    included = rng.random(400) < 0.5
    scores = included + rng.normal(0, 0.5, 400)
    once = audit_from_scores(scores, included, 1e-6, guess_counts=[50])
    twice = audit_from_scores(scores, included, 1e-6, guess_counts=[50, 50])
    assert once == twice


@pytest.mark.parametrize(
    ("scores", "included", "ks", "error"),
    [
        ([1.0, 2.0], [True, False], [], ValueError),
        ([1.0, 2.0], [True, False], [2], ValueError),
        ([1.0, 2.0], [True, False], [0], ValueError),
        ([1.0, 2.0], [1, 0], [1], TypeError),
        ([1.0, float("nan")], [True, False], [1], ValueError),
        ([1.0, 2.0, 3.0], [True, False], [1], ValueError),
    ],
)
def test_audit_invalid_inputs(scores, included, ks, error):
    with pytest.raises(error):
        audit_from_scores(np.array(scores), np.array(included), 1e-5, guess_counts=ks)
