"""fedsgd under local trust: one Gaussian-noised sum of clipped per-unit gradients per round, the server steps.

Each round is one step at Poisson rate q over the site's records or users (plan_fedsgd); the site
adds its own noise σ·C, so ε holds against anyone who sees its message. The public expected batch
size q·n goes with the sum (the server divides by it, never by the realised, private one).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from fedtransfer.common.privacy.calibration import plan_fedsgd
from fedtransfer.common.privacy.events import History
from fedtransfer.common.privacy.fedsgd import add_noise, clipped_gradient_sum, make_generator
from fedtransfer.common.privacy.mechanisms.base import Mechanism, Remember, SiteSize, SiteTensors, Trained
from fedtransfer.common.privacy.plans import Plan
from fedtransfer.common.wire.exchange import gradient_to_arrays
from fedtransfer.common.wire.protocol import Metric
from flwr.app import ArrayRecord
from torch import nn


class FedSGDLocal(Mechanism):
    protocol = "fedsgd"
    trust = "local"
    sends_gradient_sums = True

    def _check_weight(self, units: int) -> None:
        """γ is set for sites of up to max_weight units (SecAggConfig.quantum): refused before anything is spent."""
        if self.cfg.secure_aggregation and units > self.cfg.secagg.max_weight:
            raise ValueError(
                f"this site has more units than secagg.max_weight = {self.cfg.secagg.max_weight:g}; "
                "the run must raise secagg.max_weight"
            )

    def _plan(self, size: SiteSize, remember: Remember) -> Plan:
        self._check_weight(size.units)
        p, t = self.cfg.privacy, self.cfg.train
        return remember(
            plan_fedsgd,
            num_units=size.units,
            sample_rate=t.sample_rate,
            rounds=t.rounds,
            accountant=p.accountant,
            unit=p.unit,
            **self._budget(),
        )

    def train_round(
        self, head: nn.Module, data: SiteTensors, plan: Plan | None, history: History, *, seed: int, proximal_mu: float
    ) -> Trained:
        """The noisy sum of clipped per-unit gradients at Poisson rate q, and the public expected batch size."""
        q, secure_mode = self.cfg.train.sample_rate, self.cfg.privacy.secure_mode
        generator = make_generator(seed, secure_mode, data.features.device)
        clipped = clipped_gradient_sum(
            head,
            data.features,
            data.labels,
            data.units,
            q,
            None if plan is None else plan.max_grad_norm,
            generator,
            self._quantum(plan),
        )
        frozen = frozenset(k for k, _ in head.named_buffers())  # no gradient, nothing to hide: sent as zeros
        arrays = self._noisy(head, clipped.sums, plan, generator, frozen)
        event = None if plan is None else plan.round_event
        return Trained(
            arrays,
            clipped.loss,
            1,
            history if event is None else [*history, event],
            event,
            {Metric.NUM_EXAMPLES: data.units.count, Metric.EXPECTED_BATCH: q * data.units.count},
        )

    def _quantum(self, plan: Plan | None) -> float | None:
        """The integer unit each unit's clipped gradient is rounded to: none under local trust."""
        return None

    def _noisy(
        self,
        head: nn.Module,
        sums: dict[str, torch.Tensor],
        plan: Plan | None,
        generator: torch.Generator,
        frozen: frozenset[str],
    ) -> ArrayRecord:
        """The sums plus this site's own Gaussian noise σ·C."""
        std = 0.0 if plan is None else plan.noise_multiplier * plan.max_grad_norm
        noisy = add_noise(sums, std, generator, self.cfg.privacy.secure_mode, skip=frozen)
        return gradient_to_arrays(head, noisy)

    def secure_sum_quanta(self, names: Iterable[str], *, release: bool) -> dict[str, float] | None:
        """A gradient sum is read back exactly from SecAgg+'s mean, in units of the clipping norm's γ."""
        if release:
            return super().secure_sum_quanta(names, release=release)
        return dict.fromkeys(names, self.cfg.secagg.quantum(self.cfg.privacy.max_grad_norm))
