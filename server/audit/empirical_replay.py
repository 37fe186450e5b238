"""The canary test's training: the run's own mechanism and plan, replayed by one site alone for every round.

The replay does not restate a mechanism: it asks `mechanism_for(cfg)` (the object a site of this run uses)
for its plan, its round-0 statistics release and each round, so what is attacked is the code that ran:
fedavg's local DP-SGD epochs; fedsgd's noisy gradient sums and the server's own step
(fedtransfer.server.federation.strategy.server_step, with the site's public expected batch q·n as
divisor); under distributed trust the scaling by 1/γ, the rounding of each unit's clipped gradient to
integers and the site's Skellam share. When the run has a statistics release it comes first, centres the
head and starts it at the class means, as the server does; under DP without it the record-count release
comes first and is accounted, the head left as it was. The plan's rate is the one the site would plan from
its exact count (the replay's stand-in for the released one: post-processing, whatever its value). The
site is alone for every round of the run: the strongest position for the attack.

Under distributed trust the coordinator sees one of two things, and each has its own claim:
- `aggregate`: what the SecAgg+ sum reveals about this site: its message plus the noise shares of the
  other honest survivors (K_min − 1 − t of them, t the sites that may reveal their own shares,
  privacy.colluding_sites), every other site's data taken as known (zero); claim: ε against the aggregate;
- `own`: the site's message alone, as if SecAgg+ were bypassed; claim: ε against its own message.

Under `privacy.unit: user` the real records are grouped as the site groups them (by the persons the data
names, or synthetic users of `privacy.synthetic_users` records) and each canary is a user of its own.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from fedtransfer.common.config.run import RunConfig
from fedtransfer.common.model.head import make_head
from fedtransfer.common.privacy.calibration import epsilon_of
from fedtransfer.common.privacy.events import History
from fedtransfer.common.privacy.fedsgd import (
    STATS_COUNTS,
    STATS_SUMS,
    Units,
    start_from_statistics,
    stats_quanta,
    synthetic_users,
    user_seed,
)
from fedtransfer.common.privacy.mechanisms import Mechanism, SiteTensors, mechanism_for, mechanisms
from fedtransfer.common.privacy.plans import Plan, SkellamPlan
from fedtransfer.common.privacy.skellam import sample
from fedtransfer.common.wire.exchange import PREFIX
from fedtransfer.server.federation.strategy import server_step
from flwr.app import ArrayRecord
from torch import nn

Message = Literal["aggregate", "own"]  # what the coordinator sees of the site under distributed trust


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


def fresh_head(cfg: RunConfig, feature_dim: int, num_classes: int) -> nn.Sequential:
    """The run's head for these features: centred when the run releases statistics, as the server builds it."""
    return make_head(feature_dim, num_classes, cfg.head.hidden, centred=cfg.privacy.feature_stats)


def replay_plan(cfg: RunConfig, units: Units, *, feature_dim: int, num_classes: int) -> Plan:
    """The plan the run's mechanism makes for a site with these units (statistics release included)."""
    head = fresh_head(cfg, feature_dim, num_classes)
    with warnings.catch_warnings():  # "optimal order is the largest alpha": conservative, as in epsilon_of
        warnings.filterwarnings("ignore", message="Optimal order is the")
        plan = mechanism_for(cfg).plan(
            num_samples=len(units.of_record),
            units=units.count,
            dim=sum(p.numel() for p in head.parameters()),
            feature_dim=feature_dim,
            num_classes=num_classes,
            remember=lambda planner, **arguments: planner(**arguments),
        )
    assert plan is not None  # privacy.enabled: checked by the caller
    return plan


def replay_epsilon(cfg: RunConfig, history: History, message: Message) -> float:
    """The accountant's ε of this replay's history: against the aggregate, or against the site's own message."""
    p = cfg.privacy
    return epsilon_of(history, p.target_delta, p.accountant, individual=message == "own")


def honest_others(plan: SkellamPlan) -> int:
    """The other survivors whose shares the coordinator cannot subtract: K_min − 1 − t."""
    return plan.honest_survivors - 1


@dataclass(frozen=True)
class Replay:
    """What one replayed run left: the head the server ends with, the site's accountant history, its steps."""

    head: nn.Module
    history: History
    steps: int


def replay_run(
    x: torch.Tensor,
    y: torch.Tensor,
    units: Units,
    num_classes: int,
    cfg: RunConfig,
    plan: Plan | None,
    *,
    seed: int,
    message: Message = "aggregate",
    on_round: Callable[[], None] | None = None,
) -> Replay:
    """Every round of the run by this site alone, through its mechanism (`plan` None: the same protocol with
    no noise and no clipping, the positive control)."""
    mech = mechanism_for(cfg) if plan is not None else mechanisms()[(cfg.train.protocol, "local")](cfg)
    data = SiteTensors(x, y, units, num_classes)
    torch.manual_seed(seed)
    head = fresh_head(cfg, x.shape[1], num_classes)
    frozen = frozenset(k for k, _ in head.named_buffers())
    history: History = []
    t = cfg.train
    mu = t.proximal_mu if t.strategy == "fedprox" else 0.0
    with _single_thread():
        generator = torch.Generator().manual_seed(seed)
        if cfg.privacy.feature_stats:
            stats, event = mech.release(data, plan, generator)
            stats = _coordinator_view(stats, plan, message, generator, release=True)
            start_from_statistics(head, stats[STATS_SUMS], stats[STATS_COUNTS])
            history += [] if event is None else [event]
        elif plan is not None:  # the record counts alone: the head stays; the release is spent all the same
            _, event = mech.release(data, plan, generator)
            history += [] if event is None else [event]
        steps, velocity = 0, {}
        for rnd in range(t.rounds):
            trained = mech.train_round(head, data, plan, history, seed=seed * 100_003 + rnd, proximal_mu=mu)
            history, steps = trained.history, steps + trained.steps
            if mech.sends_gradient_sums:
                velocity = _server_step(head, mech, trained.arrays, plan, message, generator, velocity, units, frozen)
            if on_round is not None:
                on_round()
    return Replay(head, history, steps)


def _server_step(
    head: nn.Module,
    mech: Mechanism,
    arrays: ArrayRecord,
    plan: Plan | None,
    message: Message,
    generator: torch.Generator,
    velocity: dict[str, np.ndarray],
    units: Units,
    frozen: frozenset[str],
) -> dict[str, np.ndarray]:
    """The server's FedSGD step on what it sees of this site's gradient sum; the new momentum."""
    t = mech.cfg.train
    sums = {k.removeprefix(PREFIX): torch.from_numpy(v.numpy()) for k, v in arrays.items()}
    grads = {k: v.numpy() for k, v in _coordinator_view(sums, plan, message, generator, frozen=frozen).items()}
    weights = {k: v.detach().numpy() for k, v in head.state_dict().items()}
    weights, velocity = server_step(
        weights, grads, velocity, t.sample_rate * units.count, t.learning_rate, t.server_momentum, frozen
    )
    head.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    return velocity


def _coordinator_view(
    values: dict[str, torch.Tensor],
    plan: Plan | None,
    message: Message,
    generator: torch.Generator,
    *,
    release: bool = False,
    frozen: frozenset[str] = frozenset(),
) -> dict[str, torch.Tensor]:
    """The site's message as the coordinator sees it: alone (`own`, and always under local trust), or in the
    SecAgg+ sum with the honest survivors' shares (Skellam, summed: one draw of their total variance)."""
    if message == "own" or not isinstance(plan, SkellamPlan) or honest_others(plan) <= 0:
        return values
    if release:
        assert plan.stats_variance is not None and plan.stats_quantum is not None
        variance, quanta = plan.stats_variance, stats_quanta(plan.stats_quantum)
    else:
        variance, quanta = plan.noise_variance, dict.fromkeys(values, plan.quantum)
    others = honest_others(plan) * variance / plan.honest_survivors
    return {
        k: v if k in frozen else v + sample(v.shape, others, generator, v.device) * quanta[k] for k, v in values.items()
    }


@contextmanager
def _single_thread() -> Iterator[None]:
    """Run torch on one thread: a head's per-step tensors are tiny, and on a busy 2-core machine
    intra-op threads only add synchronisation (measured 10x slower training)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
