"""fedsgd under distributed trust: integer gradient sums with a Skellam share of the noise, masked by SecAgg+.

Each site rounds every unit's clipped gradient to integers in units of γ, sums them and adds Skellam
noise of variance μ/(K_min − t); the aggregate of any K ≥ K_min sites carries μ even when t of them reveal their
shares to the coordinator (privacy.colluding_sites; common/privacy/skellam.py).
ε holds for the aggregate; the site also reports ε against its own message, were SecAgg+ bypassed.
A plain (unmasked) message is declined: the site's share alone is not enough noise.
"""

from __future__ import annotations

import torch
from fedtransfer.common.privacy.calibration import plan_distributed
from fedtransfer.common.privacy.counts import skellam_counts
from fedtransfer.common.privacy.events import SelfComposedDpEvent, SkellamDpEvent
from fedtransfer.common.privacy.fedsgd import STATS_NORM, skellam_statistics
from fedtransfer.common.privacy.mechanisms.base import Remember, SiteSize, SiteTensors
from fedtransfer.common.privacy.mechanisms.fedsgd_local import FedSGDLocal
from fedtransfer.common.privacy.plans import Plan, SkellamPlan
from fedtransfer.common.privacy.skellam import sample, share_wrap_bound
from fedtransfer.common.wire.exchange import PREFIX, gradient_to_arrays
from fedtransfer.common.wire.protocol import DPRecord
from flwr.app import ArrayRecord
from torch import nn


class FedSGDDistributed(FedSGDLocal):
    protocol = "fedsgd"
    trust = "distributed"
    distributed = True

    def check_message(self, *, secure: bool) -> None:
        if not secure:
            raise ValueError(
                "privacy.trust: distributed: this site adds only a share of the noise, so it sends its sum "
                "only masked under secure aggregation; this training message is plain"
            )

    def _plan(self, size: SiteSize, remember: Remember) -> Plan:
        """The Skellam plan for this site's units; refused when its share could wrap modulo SecAgg+'s range."""
        self._check_weight(size.units)
        p, t, s = self.cfg.privacy, self.cfg.train, self.cfg.secagg
        feature_dim = size.feature_dim if p.feature_stats else 0
        plan = remember(
            plan_distributed,
            num_units=size.units,
            sample_rate=t.sample_rate,
            rounds=t.rounds,
            dim=size.dim,
            min_survivors=s.fewest_survivors(t.min_sites),
            colluding_sites=p.colluding_sites,
            gamma=s.quantum(p.max_grad_norm),
            stats_gamma=s.quantum(STATS_NORM),
            unit=p.unit,
            feature_dim=feature_dim,
            num_classes=size.num_classes,
            **self._budget(),
        )
        assert isinstance(plan, SkellamPlan)
        self._check_wrap(plan, units=size.units, dim=size.dim, shape=size.num_classes * (feature_dim + 1))
        return plan

    def _check_wrap(self, plan: SkellamPlan, *, units: int, dim: int, shape: int) -> None:
        """ValueError when a noisy integer sum could leave SecAgg+'s range (see share_wrap_bound)."""
        q_range = self.cfg.secagg.quantization_range
        wrap = plan.rounds * share_wrap_bound(units, plan.l2_sensitivity, plan.noise_share, dim, q_range)
        if plan.stats_variance is not None and plan.stats_l2 is not None:  # each unit moves a sum by ≤ Δ2
            wrap += share_wrap_bound(units, plan.stats_l2, plan.stats_variance / plan.honest_survivors, shape, q_range)
        if wrap > 1e-6 * plan.target_delta:
            raise ValueError(
                f"secagg.quantization_range {q_range} is too small for this site's count of units (its noisy "
                "integer sum could wrap); the run must raise "
                "secagg.max_weight (a coarser γ leaves the noise more room)"
            )

    def release(
        self, data: SiteTensors, plan: Plan | None, generator: torch.Generator
    ) -> tuple[dict[str, torch.Tensor], SelfComposedDpEvent | None]:
        """Round 0's release (the statistics, or the record counts alone) as integers in units of each tensor's
        quantum, plus this site's Skellam share."""
        assert isinstance(plan, SkellamPlan) and plan.stats_variance is not None and plan.stats_quantum is not None
        if not self.cfg.privacy.feature_stats:  # the record counts alone (common/privacy/counts.py)
            counts = skellam_counts(
                data.labels,
                data.num_classes,
                data.units,
                plan.stats_variance / plan.honest_survivors,
                generator,
                plan.stats_quantum,
            )
            return counts, plan.stats_event
        released = skellam_statistics(
            data.features,
            data.labels,
            data.num_classes,
            data.units,
            plan.stats_variance / plan.honest_survivors,
            generator,
            plan.stats_quantum,
        )
        return released, plan.stats_event

    def _quantum(self, plan: Plan | None) -> float | None:
        return plan.quantum if isinstance(plan, SkellamPlan) else None

    def _noisy(
        self,
        head: nn.Module,
        sums: dict[str, torch.Tensor],
        plan: Plan | None,
        generator: torch.Generator,
        frozen: frozenset[str],
    ) -> ArrayRecord:
        """Integers plus this site's Skellam share μ/(K_min − t), times γ (a power of two: exact) in float64."""
        assert isinstance(plan, SkellamPlan)
        noisy = {
            k: v if k in frozen else v + sample(v.shape, plan.noise_share, generator, v.device) for k, v in sums.items()
        }
        values = {k: v * plan.quantum for k, v in noisy.items()}  # back in gradient units
        as_head = gradient_to_arrays(head, values)  # names and shapes checked there
        return ArrayRecord(
            {
                PREFIX + k: values[k].detach().cpu().double().reshape(as_head[PREFIX + k].shape)
                for k in head.state_dict()
            }
        )

    def describe(self, plan: Plan, event: SelfComposedDpEvent, *, release: bool) -> DPRecord:
        """A Skellam round or release: the aggregate's variance, this site's share, γ and the sensitivities."""
        assert isinstance(plan, SkellamPlan)
        m = event.mechanism
        assert isinstance(m, SkellamDpEvent)
        sigma = plan.stats_noise_multiplier if release else plan.noise_multiplier
        return DPRecord(
            sigma or 0.0,
            event.sample_rate,
            event.count,
            STATS_NORM if release else plan.max_grad_norm,
            plan.target_delta,
            plan.accountant,
            "skellam",
            m.variance,
            m.share,
            m.min_survivors,
            (plan.stats_quantum or 0.0) if release else plan.quantum,
            m.l1_sensitivity,
            m.l2_sensitivity,
            m.colluding_sites,
        )
