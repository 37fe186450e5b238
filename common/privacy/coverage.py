"""What a site sent, value by value, and which release or public setting covers each (issue 23, item 3).

A site logs every reply it sends as `sent` (`sent_values`): each record's tensors by hash, each metric by
name and value, each config record by its keys. The audit (server/audit/coverage.py) then asks `cover`
for every value: the named release whose ε covers it (`training`, `feature-stats`, `evaluation`), the
DP record an accountant needs (`accounting`), or public configuration (`public`). A value with no cover
(a plain metric no release accounts for, an exact count) fails the audit: ε is the whole truth only if
nothing else leaves a site.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fedtransfer.common.config.run import RunConfig
from fedtransfer.common.privacy.evaluation import EVALUATION
from fedtransfer.common.storage.audit_log import update_digest
from fedtransfer.common.wire.protocol import FEATURE_STATS, Metric, Rec

TRAINING = "training"  # a training round's update (its DP record names its noise)
ACCOUNTING = "accounting"  # the DP parameters and ε the auditor recomputes: needed to check the claim
PUBLIC = "public"  # a function of the run's public configuration alone (the head's shape, the site's name)
NOT_PRIVATE = "no DP (privacy.enabled: false)"  # nothing is promised, so nothing is uncovered
UNWEIGHTED = 1.0  # the weight every site sends under DP when the run released no count, outside SecAgg+ (`unweighted`)

# metrics that are public configuration or DP accounting, whatever the release
_FIXED = {
    Metric.WIRE_BYTES: PUBLIC,  # the bytes of a tensor set of the head's public shape
    Metric.EPSILON: ACCOUNTING,
    Metric.EPSILON_INDIVIDUAL: ACCOUNTING,
    Metric.EVAL_EPSILON: ACCOUNTING,
    Metric.EVAL_EPSILON_INDIVIDUAL: ACCOUNTING,
    Metric.STEPS: ACCOUNTING,  # the DP record's step count
}
_RECORDS = {Rec.SITE: PUBLIC, Rec.DP: ACCOUNTING, Rec.EVALUATION_DP: ACCOUNTING}


def unweighted(cfg: RunConfig) -> float:
    """The weight every site sends under DP when the run released no count: public, the same at every site.

    1, or under SecAgg+ `secagg.max_weight`: SecAgg+ scales each reply by weight / max_weight before it
    quantises, so a weight of 1 would shrink the head below the quantisation step and lose it.
    """
    return float(cfg.secagg.max_weight) if cfg.secure_aggregation else UNWEIGHTED


def sent_values(answer: Any) -> dict[str, Any]:
    """Every value of a reply (a RecordDict): tensors by hash, metrics by name and value, config keys."""
    tensors = {
        key: update_digest({k: np.asarray(v.numpy()) for k, v in record.items()})["sha256"]
        for key, record in answer.array_records.items()
    }
    metrics = {str(k): float(v) for record in answer.metric_records.values() for k, v in record.items()}
    configs = {key: sorted(record) for key, record in answer.config_records.items()}
    return {"tensors": tensors, "metrics": metrics, "configs": configs}


def cover(
    kind: str,
    name: str,
    value: Any,
    *,
    release: str | None,
    private: bool,
    counted: bool,
    public_weight: float,
) -> str | None:
    """The release or setting covering one sent value, or None: `kind` tensors/metrics/configs, `release` the
    reply's release (TRAINING, FEATURE_STATS, EVALUATION), `counted` whether the site released a count this run,
    `public_weight` the run's `unweighted` weight."""
    if not private:
        return NOT_PRIVATE
    if kind == "tensors":
        if name == Rec.ARRAYS and release in (TRAINING, FEATURE_STATS):
            return release
        return EVALUATION if name == Rec.EVALUATION and release == EVALUATION else None
    if kind == "configs":
        return _RECORDS.get(name)
    if name in _FIXED:
        return _FIXED[name]
    if name in (Metric.NUM_EXAMPLES, Metric.EXPECTED_BATCH) and counted:
        return FEATURE_STATS  # the count released in round 0, post-processed (client/dp_count.py)
    if name == Metric.NUM_EXAMPLES and value == public_weight:
        return PUBLIC  # every site alike
    return None
