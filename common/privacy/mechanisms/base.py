"""The seam between a site and its privacy mechanism: one object per protocol × trust, chosen once per run.

The site (client/train_round.py) does what every mechanism shares: it checks the server's message,
charges its ledger before anything leaves, caches and logs the reply. What differs between
mechanisms lives behind this interface: how the plan is made (`plan`), what the round-0 statistics
release and each training round compute (`release`, `train_round`), and how what was spent is
described on the wire and in the audit log (`describe`). Adding a mechanism is adding a module to this
folder with one `Mechanism` subclass (fedtransfer.common.privacy.mechanisms registers it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from fedtransfer.common.config.run import RunConfig
from fedtransfer.common.privacy.counts import release_counts
from fedtransfer.common.privacy.events import History, SelfComposedDpEvent
from fedtransfer.common.privacy.fedsgd import STATS_NORM, Units, release_statistics, stats_quanta
from fedtransfer.common.privacy.plans import Plan
from fedtransfer.common.wire.protocol import DPRecord
from flwr.app import ArrayRecord
from torch import nn

# How a site makes a plan: `remember(planner, **arguments)` is `planner(**arguments)`, computed once per
# deployed site (client/prepared.py remembered_plan); planners are pure functions of public numbers.
Remember = Callable[..., Plan]


@dataclass(frozen=True)
class SiteTensors:
    """A site's training data as a mechanism sees it: cached features, labels, and the units of privacy."""

    features: torch.Tensor
    labels: torch.Tensor
    units: Units
    num_classes: int


@dataclass(frozen=True)
class SiteSize:
    """What a site's plan depends on besides the run's configuration (Mechanism.plan says what each is)."""

    num_samples: int
    units: int
    dim: int
    feature_dim: int
    num_classes: int
    released: float | None


@dataclass(frozen=True)
class Trained:
    """What one round (or the statistics release) computed: the arrays that leave, and what it spent."""

    arrays: ArrayRecord
    loss: float | None  # training loss for the site's own log; None for a release (no training)
    steps: int
    history: History  # the accountant's history after this work
    event: SelfComposedDpEvent | None  # this work's accountant event (None without DP)
    metrics: dict[str, float | int]


class Mechanism(ABC):
    """One protocol × trust: its plan, its round and release, and the record of what they spent."""

    protocol: ClassVar[str]  # train.protocol it serves
    trust: ClassVar[str]  # privacy.trust it serves
    distributed: ClassVar[bool] = False  # noise shares under SecAgg+: ε holds for the aggregate only
    # what a site sends each round: a noisy gradient sum the server steps with (fedsgd: FedSGD, the expected
    # batch size q·n goes with it), or a trained head the server averages (Flower's strategies)
    sends_gradient_sums: ClassVar[bool] = False

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    def check_message(self, *, secure: bool) -> None:
        """ValueError when this mechanism must not answer a message of this kind (plain or under SecAgg+).

        Under local trust the site's own noise protects it either way: any message is answered.
        """
        return None

    def plan(
        self,
        *,
        num_samples: int,
        units: int,
        dim: int,
        feature_dim: int,
        num_classes: int,
        remember: Remember,
        released: float | None = None,
    ) -> Plan | None:
        """The run's plan for this site (None without DP); ValueError when the site cannot take part.

        `num_samples`: the site's training records; `units`: its records or users (privacy.unit);
        `dim`: the head's trainable coordinates; `feature_dim`: the width of its cached features;
        `num_classes`: the run's classes; `released`: the count the site released in round 0 (None before it
        has), for whatever of the plan goes out and depends on a count (fedavg's sample rate).
        """
        if not self.cfg.privacy.enabled:
            return None
        size = SiteSize(num_samples, units, dim, feature_dim, num_classes, released)
        return self._plan(size, remember)

    @abstractmethod
    def _plan(self, size: SiteSize, remember: Remember) -> Plan: ...

    def _budget(self) -> dict[str, float]:
        """The planner arguments every mechanism takes from the run as they are: its ε, δ, clipping norm and
        the round-0 release's share of the budget."""
        p = self.cfg.privacy
        return {
            "target_epsilon": p.target_epsilon,
            "target_delta": p.target_delta,
            "max_grad_norm": p.max_grad_norm,
            "stats_share": p.release_share,
        }

    def release(
        self, data: SiteTensors, plan: Plan | None, generator: torch.Generator
    ) -> tuple[dict[str, torch.Tensor], SelfComposedDpEvent | None]:
        """Round 0's release under Gaussian noise (the plan's σ), and the event it cost: the feature statistics,
        or without them the record counts alone (common/privacy/counts.py)."""
        sigma = None if plan is None else plan.stats_noise_multiplier
        if not self.cfg.privacy.feature_stats:
            counts = release_counts(
                data.labels, data.num_classes, data.units, sigma, generator, self.cfg.privacy.secure_mode
            )
            return counts, None if plan is None else plan.stats_event
        released = release_statistics(
            data.features,
            data.labels,
            data.num_classes,
            data.units,
            sigma,
            generator,
            self.cfg.privacy.secure_mode,
        )
        return released, None if plan is None else plan.stats_event

    @abstractmethod
    def train_round(
        self, head: nn.Module, data: SiteTensors, plan: Plan | None, history: History, *, seed: int, proximal_mu: float
    ) -> Trained:
        """One training round from `head` (changed in place) (`proximal_mu`: the FedProx pull the server asked for)."""

    def describe(self, plan: Plan, event: SelfComposedDpEvent, *, release: bool) -> DPRecord:
        """What a Gaussian round or release spent, as logged, sent and audited (Skellam overrides)."""
        m = event.mechanism
        clip = 1.0 if release else plan.max_grad_norm  # round 0's sensitivity is 1 (unit features, counts)
        return DPRecord(m.noise_multiplier, event.sample_rate, event.count, clip, plan.target_delta, plan.accountant)

    def secure_sum_quanta(self, names: Iterable[str], *, release: bool) -> dict[str, float] | None:
        """Each tensor's unit γ on SecAgg+'s grid for a message whose exact sum the server reads back (the
        statistics, a gradient sum), or None for a head SecAgg+ averages. Site and server both ask here."""
        if release:
            return stats_quanta(self.cfg.secagg.quantum(STATS_NORM))
        return None
