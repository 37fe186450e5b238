"""fedavg under local trust: local epochs of DP-SGD (Opacus) at each site, the heads averaged by the server.

The plan covers every local step of every round the site may join (plan_dp); each round's event is
the steps Opacus actually took at the plan's (σ, q), merged into the accountant history as Opacus does.
Under DP the plan's rate q (sent in every DP record) comes from the count the site released in round 0,
never from its exact record count (client/dp_count.py); the site still trains on all its records.
"""

from __future__ import annotations

from fedtransfer.common.privacy.calibration import plan_dp
from fedtransfer.common.privacy.dp_sgd import LocalTraining, train_head
from fedtransfer.common.privacy.events import History, gaussian_steps
from fedtransfer.common.privacy.mechanisms.base import Mechanism, Remember, SiteSize, SiteTensors, Trained
from fedtransfer.common.privacy.plans import GaussianPlan, Plan
from fedtransfer.common.wire.exchange import head_to_arrays
from fedtransfer.common.wire.protocol import Metric
from torch import nn


class FedAvgLocal(Mechanism):
    protocol = "fedavg"
    trust = "local"

    def _plan(self, size: SiteSize, remember: Remember) -> Plan:
        t = self.cfg.train
        return remember(
            plan_dp,
            num_samples=size.num_samples,
            batch_size=t.batch_size,
            local_epochs=t.local_epochs,
            rounds=t.rounds,
            accountant=self.cfg.privacy.accountant,
            released_count=None if size.released is None else max(1, round(size.released)),
            **self._budget(),
        )

    def train_round(
        self, head: nn.Module, data: SiteTensors, plan: Plan | None, history: History, *, seed: int, proximal_mu: float
    ) -> Trained:
        """The local epochs of DP-SGD (plain SGD without a plan); `proximal_mu`: the server's FedProx pull."""
        assert plan is None or isinstance(plan, GaussianPlan)
        t = self.cfg.train
        opts = LocalTraining(t.local_epochs, t.batch_size, t.learning_rate, t.momentum, proximal_mu)
        outcome = train_head(
            head,
            data.features,
            data.labels,
            opts,
            plan,
            history,
            seed=seed,
            secure_mode=self.cfg.privacy.secure_mode,
        )
        event = None if plan is None else gaussian_steps(plan.noise_multiplier, plan.sample_rate, outcome.steps)
        return Trained(
            head_to_arrays(head.cpu()),
            outcome.loss,
            outcome.steps,
            outcome.history,
            event,
            {Metric.NUM_EXAMPLES: len(data.labels)},
        )
