"""Federated evaluation as a DP release: a site sends noisy sufficient statistics, the server derives the metrics.

A site's test split is private data like its training split, so its scores of the global model are a
release too. Instead of plain loss, accuracy, balanced accuracy and AUROC (each an exact function of its
test records), a site releases the statistics those metrics are computed from, with Gaussian noise:

- `eval.overall`: correct predictions, records, and the loss sum in units of LOSS_CAP (each record's loss
  clipped to LOSS_CAP, so that its share is at most 1 like the counts');
- `eval.classes`: per true class, correct predictions and records (balanced accuracy);
- `eval.scores`: per class c, histograms over public bins (SCORE_EDGES) of the score p_c of the records
  of class c and of the others (one-vs-rest AUROC, computed from the summed histograms).

The server sums the sites' releases and computes the federated metrics from the sums
(`metrics_from_statistics`): post-processing, no further cost. Each block carries a fixed weight so that
one record moves the weighted vector by at most 1 in L2 (its squared weights sum to 1 over what one record
touches: 3 overall entries, 2 class entries, C histogram bins); one Gaussian of σ (the plan's noise
multiplier) on that vector is σ/weight in each block's own units. Under `privacy.unit: user` each test
record is weighted 1/m (m: its person's test records), so a person moves it by at most 1 too.

Test and training records are disjoint, so by parallel composition this release's ε (its own budget,
`privacy.evaluation_epsilon`) does not add to the training ε: a record is in one split and is protected
by that split's ε. The `compute → release` and `sum → metrics` halves are separate functions so that the
release could travel inside a training reply (one message per round) as well as in its own.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from fedtransfer.common.model.head import EVAL_BATCH
from fedtransfer.common.privacy.calibration import calibrate
from fedtransfer.common.privacy.events import SelfComposedDpEvent, gaussian_steps
from fedtransfer.common.privacy.fedsgd import Units, add_noise
from torch import nn

EVALUATION = "evaluation"  # the release's name in the ledger, the audit log and privacy.json
OVERALL, CLASSES, SCORES = "eval.overall", "eval.classes", "eval.scores"
NAMES = (OVERALL, CLASSES, SCORES)
LOSS_CAP = 10.0  # each record's cross-entropy is clipped to this before summing (e^-10: a confident mistake)
# score bins: public edges, dense near 0 and 1 where a trained head's probabilities lie (logits -8..8)
SCORE_EDGES = torch.sigmoid(torch.linspace(-8.0, 8.0, 15, dtype=torch.float64))
BINS = len(SCORE_EDGES) + 1
# squared weights of the blocks, each over what one record touches: they add up to 1 (L2 sensitivity 1)
W_OVERALL = math.sqrt(0.5 / 3)  # half of it on the three overall entries: accuracy and loss, the headline
W_CLASSES = math.sqrt(0.25 / 2)


def w_scores(num_classes: int) -> float:
    """The histograms' weight: a record lands in one bin of each class's histogram (C bins)."""
    return math.sqrt(0.25 / num_classes)


@dataclass(frozen=True)
class EvaluationPlan:
    """Gaussian σ (on the weighted vector of L2 sensitivity 1) for `releases` evaluations in a run.

    The run's evaluations together meet (`target_epsilon`, `target_delta`): the evaluation budget,
    separate from training's by parallel composition (test and training records are disjoint).
    """

    noise_multiplier: float
    releases: int
    target_epsilon: float
    target_delta: float
    accountant: str

    @property
    def event(self) -> SelfComposedDpEvent:
        """One release: one Gaussian step at rate 1 (every test record is in it)."""
        return gaussian_steps(self.noise_multiplier, 1.0, 1)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@functools.lru_cache(maxsize=64)
def plan_evaluation(*, releases: int, target_epsilon: float, target_delta: float, accountant: str) -> EvaluationPlan:
    """The noise for `releases` evaluations meeting the evaluation budget (Opacus' calibration)."""
    sigma = calibrate((), 1.0, max(releases, 1), target_epsilon, target_delta, accountant)
    return EvaluationPlan(sigma, releases, target_epsilon, target_delta, accountant)


def evaluation_statistics(
    head: nn.Module, features: torch.Tensor, labels: torch.Tensor, num_classes: int, units: Units
) -> dict[str, torch.Tensor]:
    """The exact statistics of `head` on (features, labels), each record weighted 1/(its unit's records)."""
    logits = head_logits(head, features)
    labels = labels.cpu().long()
    w = units.weights().double() if len(labels) else torch.zeros(0, dtype=torch.float64)
    loss = nn.functional.cross_entropy(logits.float(), labels, reduction="none").double().clamp(0, LOSS_CAP)
    correct = (logits.argmax(1) == labels).double()
    overall = torch.stack([(w * correct).sum(), w.sum(), (w * loss / LOSS_CAP).sum()])
    classes = torch.zeros(2, num_classes, dtype=torch.float64)
    classes[0].index_add_(0, labels, w * correct)
    classes[1].index_add_(0, labels, w)
    probs = logits.double().softmax(1)
    bins = torch.bucketize(probs, SCORE_EDGES)  # (records, classes) in 0..BINS-1
    positive = nn.functional.one_hot(labels, num_classes).bool()
    scores = torch.zeros(num_classes, 2, BINS, dtype=torch.float64)
    for c in range(num_classes):
        for side, rows in ((0, positive[:, c]), (1, ~positive[:, c])):
            scores[c, side].index_add_(0, bins[rows, c], w[rows])
    return {OVERALL: overall, CLASSES: classes, SCORES: scores}


def head_logits(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The head's logits on the features, in batches, on the CPU."""
    device = next(head.parameters()).device
    head.eval()
    with torch.no_grad():
        return torch.cat(
            [head(features[i : i + EVAL_BATCH].to(device)) for i in range(0, max(len(features), 1), EVAL_BATCH)]
        ).cpu()


def release_evaluation(
    stats: dict[str, torch.Tensor],
    plan: EvaluationPlan | None,
    generator: torch.Generator,
    secure_mode: bool = False,
) -> dict[str, np.ndarray]:
    """The statistics as they leave the site: plus N(0, (σ/weight)²) per block under DP, exact without it."""
    num_classes = int(stats[CLASSES].shape[1])
    out = {}
    for name, weight in ((OVERALL, W_OVERALL), (CLASSES, W_CLASSES), (SCORES, w_scores(num_classes))):
        value = stats[name].float()
        if plan is not None:
            value = add_noise({name: value}, plan.noise_multiplier / weight, generator, secure_mode)[name]
        out[name] = value.double().numpy()
    return out


def sum_statistics(releases: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The sites' released statistics, summed (what the server computes the federated metrics from)."""
    return {name: np.sum([r[name] for r in releases], axis=0) for name in NAMES}


def check_statistics(stats: Any, num_classes: int) -> str | None:
    """Why a reply's statistics are unfit to sum (names, shapes, finite), or None when they are fit."""
    shapes = {OVERALL: (3,), CLASSES: (2, num_classes), SCORES: (num_classes, 2, BINS)}
    if set(stats) != set(NAMES):
        return f"evaluation statistics must be exactly {list(NAMES)}, got {sorted(stats)[:5]}"
    for name, shape in shapes.items():
        value = stats[name]
        if tuple(value.shape) != shape or not np.all(np.isfinite(value)):
            return f"evaluation statistics {name}: expected finite values of shape {shape}, got {tuple(value.shape)}"
    return None


def metrics_from_statistics(stats: dict[str, np.ndarray]) -> dict[str, float | None]:
    """accuracy, loss, balanced accuracy and macro AUROC from summed (noisy) statistics: post-processing.

    Noisy counts may be negative or exceed their totals: each ratio is taken over counts clamped at 0 and
    clipped to [0, 1]; a class whose released records are under one has no recall or AUROC of its own.
    """
    correct, total, loss = (max(float(v), 0.0) for v in stats[OVERALL])
    per_class = np.clip(stats[CLASSES], 0.0, None)
    present = per_class[1] >= 1.0
    recall = np.clip(per_class[0][present] / per_class[1][present], 0.0, 1.0)
    aurocs = [a for c in range(per_class.shape[1]) if (a := histogram_auroc(stats[SCORES][c])) is not None]
    return {
        "accuracy": min(correct / total, 1.0) if total >= 1.0 else None,
        "loss": LOSS_CAP * loss / total if total >= 1.0 else None,
        "balanced_accuracy": float(recall.mean()) if len(recall) else None,
        "auroc": float(np.mean(aurocs)) if len(aurocs) >= 2 else None,
    }


def histogram_auroc(hist: np.ndarray) -> float | None:
    """One-vs-rest AUROC from (positives, negatives) score histograms over the same bins; ties count half."""
    pos, neg = np.clip(hist[0], 0.0, None), np.clip(hist[1], 0.0, None)
    if pos.sum() < 1.0 or neg.sum() < 1.0:
        return None
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    return float(np.clip(np.sum(pos * (below + 0.5 * neg)) / (pos.sum() * neg.sum()), 0.0, 1.0))
