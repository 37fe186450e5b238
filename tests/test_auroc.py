"""The macro AUROC of every evaluation and collaboration report is scikit-learn's, ties and absent classes too."""

from __future__ import annotations

import numpy as np
import pytest
from fedtransfer.common.model.head import macro_auroc
from sklearn.metrics import roc_auc_score


def _sklearn_macro(truth: np.ndarray, probs: np.ndarray) -> float:
    return float(np.mean([roc_auc_score(truth == c, probs[:, c]) for c in np.unique(truth)]))


@pytest.mark.parametrize("seed", range(5))
def test_equals_scikit_learn_on_tied_scores_and_bootstrap_resamples(seed: int) -> None:
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 6, 90)
    truth[truth == 5] = 4  # class 5 never appears: it is left out of the mean
    probs = np.round(rng.dirichlet(np.ones(6), 90), 1)  # coarse scores: many ties
    draw = rng.integers(0, 90, 90)
    for t, p in ((truth, probs), (truth[draw], probs[draw])):
        assert macro_auroc(t, p) == pytest.approx(_sklearn_macro(t, p), abs=1e-12)


def test_perfect_reversed_and_single_class() -> None:
    truth = np.array([0, 0, 1, 1])
    right = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9]])
    assert macro_auroc(truth, right) == 1.0
    assert macro_auroc(truth, right[:, ::-1]) == 0.0
    assert macro_auroc(np.zeros(4, dtype=int), right) is None
