"""A binary model's decision threshold: the positive class (the second class name) when its probability is at
least the threshold, instead of argmax (0.5).

Why: on a table with a few percent positives, a DP-trained head's probabilities of the positive class stay low,
and argmax answers "negative" for nearly every record: a bank learns nothing about the defaults it joined to
catch. Where the threshold may be chosen, and on what, is the privacy question:

- A site chooses its own final model's threshold on the validation split it carved from its training split
  (client/site_model/threshold.py), by the run's rule (`personal.threshold`). Those records never leave the site, and
  neither does the threshold.
- The global model's threshold is chosen at the server, which holds no validation data: its hold-out is for
  final scoring only, and tuning on it would make the reported hold-out scores optimistic. A site's threshold
  is a statistic of its records that no DP covers, so it is not sent either. What the server has for free is
  post-processing of DP releases: the class counts of round 0's feature-statistics release
  (`privacy.feature_stats`). For calibrated probabilities, balanced accuracy is highest at the threshold equal
  to the positive class's prevalence, and the cost rule's Bayes threshold is 1 / (1 + R), which needs no data.
  A run with no statistics release keeps 0.5 (argmax) under balanced_accuracy, and says so in the model file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from fedtransfer.common.config.finetune import ThresholdRule

POSITIVE = 1  # the positive class's index: the second of the two class names (classes are sorted)
ARGMAX = 0.5


@dataclass(frozen=True)
class Threshold:
    """A binary model's threshold on the positive class's probability, the rule it follows and what it was chosen on."""

    value: float
    rule: str  # balanced_accuracy, cost:R
    chosen_on: str  # one line a person reads: which records, or which release, or why argmax
    records: int | None = None  # records it was chosen on (None: chosen on no records)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: object) -> Threshold | None:
        """A stored threshold, or None where `raw` is not one (a model file written before thresholds)."""
        if not isinstance(raw, dict):
            return None
        value = raw.get("value")
        if not isinstance(value, float | int) or not 0.0 <= float(value) <= 1.0:
            return None
        records = raw.get("records")
        return cls(float(value), str(raw.get("rule", "")), str(raw.get("chosen_on", "")), records)


def decide(probs: np.ndarray, threshold: float | None) -> np.ndarray:
    """Class indices: argmax, or for two classes and a threshold, positive where its probability reaches it."""
    probs = np.asarray(probs)
    if threshold is None or probs.shape[1] != 2:
        return probs.argmax(1)
    return (probs[:, POSITIVE] >= threshold).astype(np.int64)


def best_threshold(positive_probs: np.ndarray, truth: np.ndarray, rule: ThresholdRule) -> float | None:
    """The threshold on these records that maximises balanced accuracy or minimises FP + R·FN.

    The candidates are the midpoints between consecutive distinct probabilities (and just outside both ends),
    so no record sits on the threshold; among equally good ones the closest to 0.5 wins (the least departure
    from argmax). None where the records do not hold both classes: nothing can be chosen on them.
    """
    p, y = np.asarray(positive_probs, dtype=np.float64), np.asarray(truth).astype(np.int64)
    positives, negatives = int((y == POSITIVE).sum()), int((y != POSITIVE).sum())
    if positives == 0 or negatives == 0:
        return None
    levels = np.unique(p)
    candidates = np.concatenate([[levels[0] / 2], (levels[1:] + levels[:-1]) / 2, [(levels[-1] + 1) / 2]])
    predicted = p[None, :] >= candidates[:, None]  # (candidates, records)
    tp = (predicted & (y == POSITIVE)).sum(1)
    fp = (predicted & (y != POSITIVE)).sum(1)
    if rule.kind == "balanced_accuracy":
        merit = tp / positives + (negatives - fp) / negatives
    else:
        merit = -(fp + float(rule.cost_ratio or 1.0) * (positives - tp))
    best = np.flatnonzero(np.isclose(merit, merit.max(), rtol=0, atol=1e-12))
    return float(candidates[best[np.argmin(np.abs(candidates[best] - ARGMAX))]])


def global_threshold(rule: ThresholdRule, class_counts: list[float] | None) -> Threshold:
    """The global model's threshold, from what the server may use: the rule itself, or the DP class counts.

    `class_counts`: the noisy per-class counts of round 0's statistics release (None where the run had none).
    """
    if rule.kind == "cost":
        value = 1.0 / (1.0 + float(rule.cost_ratio or 1.0))
        return Threshold(value, str(rule), f"the Bayes threshold 1 / (1 + {rule.cost_ratio:g}): needs no records")
    if class_counts is None or len(class_counts) != 2:
        return Threshold(
            ARGMAX,
            str(rule),
            "argmax: the server holds no validation records and this run had no DP class counts "
            "(privacy.feature_stats: false); each site chooses its own final model's threshold",
        )
    counts = np.clip(np.asarray(class_counts, dtype=np.float64), 1.0, None)  # noisy counts, clamped as for the start
    prevalence = float(counts[POSITIVE] / counts.sum())
    return Threshold(
        prevalence,
        str(rule),
        f"the positive class's prevalence {prevalence:.4f} from round 0's DP class counts "
        "(free post-processing of the statistics release)",
    )
