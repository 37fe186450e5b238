"""The server's side of the masked evaluation (distributed trust): the slots it sends, the sum it reads back.

A round that carries an evaluation under `privacy.trust: distributed` sends the head with zero tensors named
like the evaluation's statistics (`with_slot_placeholders`). Every site of the round fills them (its integer
statistics plus a Skellam share, or its share alone: client/evaluate_masked.py) and SecAgg+ masks them with the
head, so what the server reconstructs is their sum over the round's sites, never one site's statistics. Under
fedsgd every site's SecAgg+ weight is max_weight (ratio 1), so the workflow's dequantised mean is the sum over the
surviving sites divided by their number; `sum_of_mean` reads the exact integer sum back (modulo the quantisation
range, which each site's `check_wrap` keeps it inside), in units of γ_e, and `statistics_of_sum` divides out the
blocks' weights: the statistics `metrics_from_statistics` takes, post-processing of the secure sum.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from fedtransfer.common.config.run import SecAggConfig
from fedtransfer.common.privacy.evaluation_skellam import evaluation_quantum, shapes, slots, statistics_of_sum
from fedtransfer.common.wire.secure_sum import sum_of_mean
from fedtransfer.server.federation.secure import SecureRound
from flwr.app import Array, ArrayRecord


def with_slot_placeholders(arrays: ArrayRecord, num_classes: int) -> ArrayRecord:
    """The head, then the evaluation's slots as float64 zeros (the sites fill them; the sum is read exactly)."""
    if num_classes < 2:
        raise ValueError(f"the masked evaluation's slots need the run's classes, got {num_classes}")
    placeholders = {name: Array(np.zeros(shape, dtype=np.float64)) for name, shape in shapes(num_classes).items()}
    return ArrayRecord({**dict(arrays.items()), **placeholders})


def split_slots(
    sec: SecureRound, aggregate: ArrayRecord, head_names: list[str], settings: SecAggConfig, num_classes: int
) -> tuple[SecureRound, ArrayRecord, dict[str, np.ndarray]]:
    """The round without its slots (the head's mean, as if none were sent) and the statistics summed in them."""
    names = list(aggregate.keys())
    means = dict(zip(names, sec.mean64 or [], strict=True))
    gamma = evaluation_quantum(settings)
    summed = {
        n: sum_of_mean(means[n], len(sec.trained), gamma, settings.clipping_range, settings.quantization_range)
        for n in slots(names)
    }
    head = ArrayRecord({n: aggregate[n] for n in head_names})
    trimmed = replace(sec, mean64=[means[n] for n in head_names] if sec.mean64 is not None else None)
    return trimmed, head, statistics_of_sum(summed, num_classes)
