"""What a site sent, value by value, and which release or public setting covers each (issue 23, item 3).

A site logs every reply it sends as `sent` (`sent_values`): each record's tensors by hash, each metric by
name and value, each config record by its keys. The audit (server/audit/coverage.py) then asks `cover`
for every value: the named release whose ε covers it (`training`, `feature-stats`, `record-counts`,
`evaluation`), the DP record an accountant needs (`accounting`), or public configuration (`public`). A value
with no cover (a plain metric no release accounts for, an exact count) fails the audit: ε is the whole truth
only if nothing else leaves a site.

Under DP every value that depends on a site's size (its weight, fedsgd's expected batch q·n, fedavg's sample
rate and steps) must follow from the count it released in round 0 (`Released`): it is covered by that
release only when it equals what the released count gives (`follows`); the exact count, or anything else,
is covered by nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from fedtransfer.common.config.run import RunConfig
from fedtransfer.common.privacy.calibration import steps_per_epoch
from fedtransfer.common.privacy.evaluation import EVALUATION
from fedtransfer.common.storage.audit_log import update_digest
from fedtransfer.common.wire.protocol import FEATURE_STATS, RECORD_COUNTS, Metric, Rec

TRAINING = "training"  # a training round's update (its DP record names its noise)
ACCOUNTING = "accounting"  # the DP parameters and ε the auditor recomputes: needed to check the claim
PUBLIC = "public"  # a function of the run's public configuration alone (the head's shape, the site's name)
NOT_PRIVATE = "no DP (privacy.enabled: false)"  # nothing is promised, so nothing is uncovered
RELEASES = (FEATURE_STATS, RECORD_COUNTS)  # round 0's releases: each gives away the site's count

# metrics that are public configuration or DP accounting, whatever the release
_FIXED = {
    Metric.WIRE_BYTES: PUBLIC,  # the bytes of a tensor set of the head's public shape
    Metric.EPSILON: ACCOUNTING,
    Metric.EPSILON_INDIVIDUAL: ACCOUNTING,
    Metric.EVAL_EPSILON: ACCOUNTING,
    Metric.EVAL_EPSILON_INDIVIDUAL: ACCOUNTING,
}
_RECORDS = {Rec.SITE: PUBLIC, Rec.DP: ACCOUNTING, Rec.EVALUATION_DP: ACCOUNTING}


@dataclass(frozen=True)
class Released:
    """The count a site released in round 0 (its `release`, FEATURE_STATS or RECORD_COUNTS): the summed noisy
    per-class counts, clamped at 1 (client/dp_count.py), as its release's log record names it."""

    release: str
    count: float


def follows(name: str, value: Any, released: Released | None, cfg: RunConfig | None, *, release: str) -> bool:
    """Whether a size-dependent value (`name`: a metric, or `dp.sample_rate`) of a reply of `release` is what the
    released count gives, so that it is post-processing of that release; False without a released count or for a
    value it does not give (an exact count).

    Weight: the count. fedsgd's expected batch: q·count. fedavg's Poisson rate: 1/⌈count/batch⌉ (plan_dp); its
    steps: local_epochs × ⌊1/rate⌋ (Opacus' DPDataLoader). Round 0's release and fedsgd's rounds: one step at a
    public rate.
    """
    if released is None or not isinstance(value, int | float) or isinstance(value, bool):
        return False
    if name == Metric.NUM_EXAMPLES:
        return math.isclose(value, released.count, rel_tol=1e-9)
    if cfg is None:  # the run's public configuration is unreadable: nothing else can be recomputed
        return False
    t = cfg.train
    if name == Metric.EXPECTED_BATCH:
        return t.protocol == "fedsgd" and math.isclose(value, t.sample_rate * released.count, rel_tol=1e-9)
    if release != TRAINING or t.protocol == "fedsgd":
        rate, steps = (1.0, 1) if release != TRAINING else (t.sample_rate, 1)
    else:
        rate = 1.0 / steps_per_epoch(max(1, round(released.count)), t.batch_size)
        steps = t.local_epochs * int(1 / rate)
    wanted = {DP_RATE: rate, Metric.STEPS: steps}.get(name)
    return wanted is not None and math.isclose(value, wanted, rel_tol=1e-12)


DP_RATE = "dp.sample_rate"  # the DP record's Poisson rate, as the coverage check names it


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
    released: Released | None,
    cfg: RunConfig | None,
) -> str | None:
    """The release or setting covering one sent value, or None: `kind` tensors/metrics/configs, `release` the
    reply's release (TRAINING, FEATURE_STATS, RECORD_COUNTS, EVALUATION), `released` the count the site released
    in round 0 of this run (None: none), `cfg` the run's configuration (None: unreadable)."""
    if not private:
        return NOT_PRIVATE
    if kind == "tensors":
        if name == Rec.ARRAYS and release in (TRAINING, *RELEASES):
            return release
        return EVALUATION if name == Rec.EVALUATION and release == EVALUATION else None
    if kind == "configs":
        return _RECORDS.get(name)
    if name in _FIXED:
        return _FIXED[name]
    if name in (Metric.NUM_EXAMPLES, Metric.EXPECTED_BATCH, Metric.STEPS, DP_RATE) and follows(
        name, value, released, cfg, release=release or TRAINING
    ):
        assert released is not None
        return released.release  # the count released in round 0, post-processed (client/dp_count.py)
    return None
