"""The evaluation release under distributed trust: integer statistics plus a Skellam share, summed under SecAgg+.

Under `privacy.trust: distributed` the coordinator is trusted with sums only. A site's evaluation statistics
(common/privacy/evaluation.py: the weighted vector of L2 sensitivity 1) are therefore rounded to integers at a
public quantum γ_e, a Skellam share of variance μ_e/(K_min − t) is added, and the result rides in the masked
vector of the round's SecAgg+ exchange (slots named like the statistics, `slots`): the server reads back only
the integer sum over the round's sites and derives the metrics from it. As for training
(common/privacy/skellam.py), the K_min − t honest shares carry μ_e, so the aggregate's ε is that of one Skellam
release of variance μ_e; the site also reports ε against its own message (its share alone).

Each unit's weighted contribution is rounded on its own (as fedsgd rounds each unit's gradient), so that
removing a unit removes exactly its rounded vector: Δ2 = 1/γ_e + √D/2 (`skellam.sensitivities`). γ_e is chosen
as training's γ is (`SecAggConfig.quantum` of the sensitivity, 1), so a site of up to secagg.max_weight test units
keeps its sum within about ±Q/4 per coordinate; `check_wrap` declines where the share could wrap.

The final model's evaluation is its own exchange after the last round (an evaluate message, which Flower's
SecAgg+ does not mask), so it stays the local-trust Gaussian release, of σ planned for the run's R evaluations:
that release alone is fully noised, its ε is the same against the aggregate and against its own message. μ_e is
calibrated so that the R − 1 Skellam releases and that one Gaussian together meet the evaluation budget
(`calibrate_variance`'s prefix), one history in the site's ledger.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from fedtransfer.common.config.run import SecAggConfig
from fedtransfer.common.privacy import skellam
from fedtransfer.common.privacy.evaluation import (
    CLASSES,
    LOSS_CAP,
    NAMES,
    OVERALL,
    SCORE_EDGES,
    SCORES,
    W_CLASSES,
    W_OVERALL,
    EvaluationPlan,
    head_logits,
    plan_evaluation,
    w_scores,
)
from fedtransfer.common.privacy.events import SelfComposedDpEvent, skellam_steps
from fedtransfer.common.privacy.fedsgd import Units
from fedtransfer.common.wire.protocol import DPRecord
from torch import nn

WRAP_TOLERANCE = 1e-6  # of δ: the chance, over the run, that a share wraps modulo SecAgg+'s range


def shapes(num_classes: int) -> dict[str, tuple[int, ...]]:
    """The statistics' shapes (common/privacy/evaluation.py), in the order they are flattened and sent."""
    return {OVERALL: (3,), CLASSES: (2, num_classes), SCORES: (num_classes, 2, len(SCORE_EDGES) + 1)}


def block_weights(num_classes: int) -> dict[str, float]:
    """Each block's weight: the weighted vector moves by at most 1 in L2 when one unit goes."""
    return {OVERALL: W_OVERALL, CLASSES: W_CLASSES, SCORES: w_scores(num_classes)}


def dimension(num_classes: int) -> int:
    return sum(math.prod(s) for s in shapes(num_classes).values())


def slots(names: list[str]) -> list[str]:
    """The evaluation's slots among the tensor names of a SecAgg+ round (none: the round scores nothing masked)."""
    return [n for n in names if n in NAMES]


def evaluation_quantum(secagg: SecAggConfig) -> float:
    """γ_e, the unit of the statistics' integers: chosen as training's γ is, for the vector's L2 sensitivity 1."""
    return secagg.quantum(1.0)


@dataclass(frozen=True)
class SkellamEvaluationPlan:
    """μ_e (the aggregate's variance, in units of γ_e) for the run's evaluations carried under SecAgg+.

    `releases` counts every evaluation of the run; R − 1 are Skellam (masked) and the final one is `final`'s
    Gaussian. Plain floats and ints, so that the plan is cached and compared by value.
    """

    variance: float
    quantum: float
    l1_sensitivity: float
    l2_sensitivity: float
    dim: int
    min_survivors: int
    colluding_sites: int
    releases: int
    final: EvaluationPlan
    target_epsilon: float
    target_delta: float
    accountant: str

    @property
    def share(self) -> float:
        """The variance one site adds: μ_e/(K_min − t)."""
        return self.variance / (self.min_survivors - self.colluding_sites)

    @property
    def event(self) -> SelfComposedDpEvent:
        """One masked release: one Skellam step at rate 1 (every test unit is in it)."""
        return skellam_steps(
            self.variance,
            1.0,
            1,
            l1=self.l1_sensitivity,
            l2=self.l2_sensitivity,
            min_survivors=self.min_survivors,
            colluding_sites=self.colluding_sites,
        )

    def record(self) -> DPRecord:
        """The DP record a masked release is sent and logged with (σ: √μ_e/Δ2, as training's)."""
        return DPRecord(
            math.sqrt(self.variance) / self.l2_sensitivity,
            1.0,
            1,
            1.0,
            self.target_delta,
            self.accountant,
            "skellam",
            self.variance,
            self.share,
            self.min_survivors,
            self.quantum,
            self.l1_sensitivity,
            self.l2_sensitivity,
            self.colluding_sites,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@functools.lru_cache(maxsize=64)
def plan_skellam_evaluation(
    *,
    releases: int,
    target_epsilon: float,
    target_delta: float,
    accountant: str,
    num_classes: int,
    quantum: float,
    min_survivors: int,
    colluding_sites: int,
) -> SkellamEvaluationPlan:
    """μ_e such that `releases` − 1 Skellam releases and the final Gaussian one meet the evaluation budget."""
    final = plan_evaluation(
        releases=releases, target_epsilon=target_epsilon, target_delta=target_delta, accountant=accountant
    )
    dim = dimension(num_classes)
    d1, d2 = skellam.sensitivities(1.0, quantum, dim)
    carried = max(releases - 1, 1)
    variance = skellam.calibrate_variance(1.0, carried, target_epsilon, target_delta, d1, d2, (final.event,))
    return SkellamEvaluationPlan(
        variance,
        quantum,
        d1,
        d2,
        dim,
        min_survivors,
        colluding_sites,
        releases,
        final,
        target_epsilon,
        target_delta,
        accountant,
    )


def check_wrap(plan: SkellamEvaluationPlan, units: int, modulus: int) -> str | None:
    """Why this site's noisy integer sums could wrap modulo SecAgg+'s range (`share_wrap_bound`), or None."""
    wrap = plan.releases * skellam.share_wrap_bound(units, plan.l2_sensitivity, plan.share, plan.dim, modulus)
    if wrap <= WRAP_TOLERANCE * plan.target_delta:
        return None
    return (
        f"secagg.quantization_range {modulus} is too small for this site's {units} test units (its noisy integer "
        f"evaluation statistics could wrap, probability up to {wrap:.2g}); the run must raise secagg.max_weight"
    )


def integer_statistics(
    head: nn.Module, features: torch.Tensor, labels: torch.Tensor, num_classes: int, units: Units, quantum: float
) -> dict[str, torch.Tensor]:
    """The weighted statistics in units of γ_e as int64, each unit's contribution rounded on its own.

    Summed over units and divided by γ_e·weight, they are `evaluation_statistics` up to the rounding.
    """
    logits = head_logits(head, features)
    labels = labels.cpu().long()
    n, weights = len(labels), block_weights(num_classes)
    w = units.weights().double() if n else torch.zeros(0, dtype=torch.float64)
    loss = nn.functional.cross_entropy(logits.float(), labels, reduction="none").double().clamp(0, LOSS_CAP)
    correct = (logits.argmax(1) == labels).double()
    rows = {name: torch.zeros(n, *shape, dtype=torch.float64) for name, shape in shapes(num_classes).items()}
    rows[OVERALL] = torch.stack([w * correct, w, w * loss / LOSS_CAP], dim=1)
    index = torch.arange(n)
    rows[CLASSES][index, 0, labels] = w * correct
    rows[CLASSES][index, 1, labels] = w
    bins = torch.bucketize(logits.double().softmax(1), SCORE_EDGES)  # (records, classes)
    positive = nn.functional.one_hot(labels, num_classes).bool()
    for c in range(num_classes):
        rows[SCORES][index, c, (~positive[:, c]).long(), bins[:, c]] = w
    out = {}
    for name, per_record in rows.items():
        per_unit = torch.zeros(units.count, *per_record.shape[1:], dtype=torch.float64)
        per_unit.index_add_(0, units.of_record, per_record * (weights[name] / quantum))
        out[name] = torch.round(per_unit).sum(0).long()
    return out


def share_values(
    integers: dict[str, torch.Tensor] | None, plan: SkellamEvaluationPlan, num_classes: int, generator: torch.Generator
) -> dict[str, np.ndarray]:
    """What a site puts in the evaluation slots: its integers (None: zeros) plus its Skellam share, times γ_e.

    A site asked for no statistics (not sampled, or declining) still adds its share on zeros: noise alone reveals
    nothing, and the sum keeps the variance it was planned with whichever survivors scored the model.
    """
    out = {}
    for name, shape in shapes(num_classes).items():
        base = torch.zeros(shape, dtype=torch.int64) if integers is None else integers[name]
        noisy = base + skellam.sample_integers(torch.Size(shape), plan.share, generator)
        out[name] = noisy.double().numpy() * plan.quantum  # γ_e a power of two: exact
    return out


def statistics_of_sum(summed: dict[str, np.ndarray], num_classes: int) -> dict[str, np.ndarray]:
    """The summed statistics in their own units (`metrics_from_statistics`'): the weighted sums over the weights."""
    weights = block_weights(num_classes)
    return {name: np.asarray(summed[name], dtype=np.float64) / weights[name] for name in NAMES}
