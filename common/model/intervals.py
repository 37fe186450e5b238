"""95% intervals for the scores the product reports to a person: Wilson for accuracy, Hanley-McNeil for AUROC.

Why: a score without its record count and interval misleads. A 43-record hold-out reported 0.907 where 106
outside records gave 0.755; the Wilson interval of 39/43 is [0.78, 0.96], which says at once that 0.907 was
a rough figure. Closed forms, not a bootstrap, because these run on every round's console line and in
status.json; the site's collaboration report keeps its bootstrap (client/site_model/report.py), which also
covers balanced accuracy.

- Wilson (1927): the score interval of a binomial proportion. Unlike the normal ("Wald") interval it stays
  inside [0, 1] and does not collapse to a point at 0/n or n/n, which matters at 97% accuracy on 100 records.
- Hanley & McNeil (1982): the standard error of an AUROC from the AUROC itself and the two class counts,
  interval = AUROC ± z·SE clipped to [0, 1]. For several classes (macro one-vs-rest) the mean of the
  per-class standard errors is used, each class against the rest: an approximation that is not too narrow
  as long as the per-class AUROCs are similar.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of `successes` out of `n`; None for n = 0 (nothing was measured)."""
    if n <= 0:
        return None
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in 0..{n}, got {successes}")
    p = successes / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_interval(accuracy: float | None, records: int) -> list[float] | None:
    """The Wilson interval of an accuracy measured on `records` records (the count of correct ones is
    accuracy·records, rounded); None where there is no accuracy or no record."""
    if accuracy is None or records <= 0 or math.isnan(accuracy):
        return None
    low, high = wilson(min(max(round(accuracy * records), 0), records), records)
    return [low, high]


def hanley_mcneil_se(auc: float, positives: int, negatives: int) -> float:
    """Hanley & McNeil's (1982) standard error of an AUROC measured on `positives` and `negatives` records."""
    if positives <= 0 or negatives <= 0:
        raise ValueError("an AUROC needs at least one record of each side")
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    variance = (auc * (1 - auc) + (positives - 1) * (q1 - auc * auc) + (negatives - 1) * (q2 - auc * auc)) / (
        positives * negatives
    )
    return math.sqrt(max(variance, 0.0))


def auroc_interval(auc: float | None, class_counts: Sequence[int], z: float = Z95) -> tuple[float, float] | None:
    """AUROC ± z·SE (Hanley-McNeil) clipped to [0, 1]; macro one-vs-rest over the classes present.

    `class_counts`: records of each class in the scored set (absent classes are 0 and ignored).
    None where no AUROC exists (fewer than two classes present).
    """
    present = [int(c) for c in class_counts if c > 0]
    if auc is None or len(present) < 2:
        return None
    total = sum(present)
    se = float(np.mean([hanley_mcneil_se(auc, c, total - c) for c in present]))
    return max(0.0, auc - z * se), min(1.0, auc + z * se)


def with_intervals(scores: dict[str, float | None], labels: np.ndarray) -> dict[str, object]:
    """`scores` (accuracy, auroc, ...) with the record count and the 95% intervals of accuracy and AUROC added.

    `labels` are the scored records' true classes: their count is `records`, their class counts feed
    Hanley-McNeil. Keys: records, accuracy_interval95, auroc_interval95 (None where the score is None).
    """
    labels = np.asarray(labels).astype(np.int64).ravel()
    n = len(labels)
    counts = np.bincount(labels) if n else np.zeros(0, dtype=np.int64)
    auc_ci = auroc_interval(scores.get("auroc"), counts.tolist())
    return {
        **scores,
        "records": n,
        "accuracy_interval95": accuracy_interval(scores.get("accuracy"), n),
        "auroc_interval95": None if auc_ci is None else [auc_ci[0], auc_ci[1]],
    }


def described(value: float | None, interval: Sequence[float] | None, records: int | None) -> str:
    """`0.907 [0.780, 0.963] on 43 records`, the way every reported score reads; `-` where none exists."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{value:.3f}"
    if interval is not None:
        text += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
    return text if records is None else f"{text} on {records} records"


def described_accuracy(accuracy: float | None, scores: dict | None) -> str:
    """An accuracy as `described`, with the interval and record count of the `scores` it came from (a metrics
    line's `server`, status.json's `final_metrics`) where they have them."""
    scores = scores or {}
    return described(accuracy, scores.get("accuracy_interval95"), scores.get("records"))
