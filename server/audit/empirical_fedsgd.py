"""The canary test's training under `train.protocol: fedsgd`: the site's own release and gradient sums, the
server's own step.

As for fedavg (server/audit/empirical.py) the site is alone for every round of the run, the
strongest position for the attack: its statistics release (when the run has one) centres
and starts the head, then each round its noisy gradient sum (fedtransfer.common.privacy.fedsgd, the code the
site runs) goes through the server's step (fedtransfer.server.federation.strategy.server_step, the code the server
runs) with the site's own public expected batch size q·n as divisor.

Under `privacy.unit: user` the real records are grouped as the site groups them (by the persons
the data names, or synthetic users of `privacy.synthetic_users` records) and each canary is a user of its own.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from fedtransfer.common.config.run import RunConfig
from fedtransfer.common.model.head import make_head
from fedtransfer.common.privacy.calibration import plan_fedsgd
from fedtransfer.common.privacy.events import History
from fedtransfer.common.privacy.fedsgd import (
    STATS_COUNTS,
    STATS_SUMS,
    Units,
    add_noise,
    clipped_gradient_sum,
    release_statistics,
    start_from_statistics,
    synthetic_users,
    user_seed,
)
from fedtransfer.common.privacy.plans import GaussianPlan
from fedtransfer.server.federation.strategy import server_step
from torch import nn


def canary_units(num_real: int, num_total: int, cfg: RunConfig, users: np.ndarray | None = None) -> Units:
    """Sampling units of the real records (then the included canaries, each its own unit); `users`: the real
    records' person codes when the data names them (Samples.user_codes), else the synthetic grouping."""
    if cfg.privacy.unit != "user":
        return Units.records(num_total)
    real = (
        torch.from_numpy(users)
        if users is not None
        else synthetic_users(num_real, cfg.privacy.synthetic_users, user_seed(cfg.seed, "empirical-audit"))
    )
    canaries = torch.arange(num_total - num_real) + (int(real.max()) + 1 if num_real else 0)
    return Units.of_users(torch.cat([real, canaries]))


def fedsgd_plan(cfg: RunConfig, units: Units) -> GaussianPlan:
    """The plan the site makes for this many units, the statistics release included when configured."""
    t, p = cfg.train, cfg.privacy
    share = p.feature_stats_share if p.feature_stats else None
    return plan_fedsgd(
        num_units=units.count,
        sample_rate=t.sample_rate,
        rounds=t.rounds,
        target_epsilon=p.target_epsilon,
        target_delta=p.target_delta,
        max_grad_norm=p.max_grad_norm,
        accountant=p.accountant,
        stats_share=share,
        unit=p.unit,
    )


def train_fedsgd(
    x: torch.Tensor,
    y: torch.Tensor,
    units: Units,
    num_classes: int,
    cfg: RunConfig,
    plan: GaussianPlan | None,
    seed: int,
    on_round: Callable[[], None] | None = None,
) -> tuple[nn.Module, History, int]:
    """A fresh head trained the fedsgd way by one site: (head, accountant history, steps)."""
    t = cfg.train
    torch.manual_seed(seed)
    head = make_head(x.shape[1], num_classes, cfg.head.hidden, centred=cfg.privacy.feature_stats)
    generator = torch.Generator().manual_seed(seed)
    history: History = []
    if cfg.privacy.feature_stats:
        stats = release_statistics(x, y, num_classes, units, plan.stats_noise_multiplier if plan else None, generator)
        start_from_statistics(head, stats[STATS_SUMS], stats[STATS_COUNTS])
        history += [plan.stats_event] if plan else []
    frozen = frozenset(k for k, _ in head.named_buffers())
    velocity: dict[str, np.ndarray] = {}
    for _ in range(t.rounds):
        clipped = clipped_gradient_sum(
            head, x, y, units, t.sample_rate, plan.max_grad_norm if plan else None, generator
        )
        noisy = add_noise(
            clipped.sums, plan.noise_multiplier * plan.max_grad_norm if plan else 0.0, generator, skip=frozen
        )
        weights = {k: v.detach().numpy() for k, v in head.state_dict().items()}
        grads = {k: v.numpy() for k, v in noisy.items()}
        weights, velocity = server_step(
            weights, grads, velocity, t.sample_rate * units.count, t.learning_rate, t.server_momentum, frozen
        )
        head.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
        history += [plan.round_event] if plan else []
        if on_round is not None:
            on_round()
    return head, history, t.rounds
