"""How sites train and what privacy each keeps: the run config's `train:` and `privacy:` sections.

Kept beside common/config/run.py (which composes them into RunConfig and re-exports them) so that the
run config stays a screen per section. Every value is checked here, one line naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedtransfer.common.config.parse import require as _require


@dataclass(frozen=True)
class TrainConfig:
    rounds: int = 30
    local_epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 1.0
    momentum: float = 0.0
    strategy: Literal["fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg"] = "fedavg"
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.1
    trimmed_beta: float = 0.2
    max_update_norm: float | None = None
    fraction_train: float = 1.0
    min_sites: int = 2
    fraction_evaluate: float = 1.0
    # federated evaluation of the model of every evaluate_every-th round and the last. Each model is scored in
    # the next round's training message (one round behind, no exchange of its own); only the final model's
    # evaluation is an exchange of its own. Every evaluation spends part of privacy.evaluation_epsilon
    evaluate_every: int = 1
    round_timeout_s: float = 600.0
    # fedavg: local epochs of DP-SGD, heads averaged. fedsgd: one clipped, noised gradient sum per site and round,
    # the server steps (learning_rate, server_momentum) from the sum divided by the public expected batch size.
    protocol: Literal["fedavg", "fedsgd"] = "fedsgd"
    sample_rate: float = 1.0  # fedsgd: Poisson rate at which a site samples its records (or users) each round
    server_momentum: float = 0.9  # fedsgd: heavy-ball momentum of the server's step

    def __post_init__(self) -> None:
        _require(1 <= self.rounds <= 10_000, "train.rounds", "must be 1..10000", self.rounds)
        _require(0 < self.sample_rate <= 1, "train.sample_rate", "must be in (0, 1]", self.sample_rate)
        _require(0 <= self.server_momentum < 1, "train.server_momentum", "must be in [0, 1)", self.server_momentum)
        _require(
            self.protocol == "fedavg" or self.strategy == "fedavg",
            "train.strategy",
            "needs train.protocol: fedavg (fedsgd, the default, steps from the sum of the sites' gradients, "
            "with no model per site to combine); set it, or leave strategy: fedavg",
            self.strategy,
        )
        _require(
            self.protocol == "fedavg" or self.max_update_norm is None,
            "train.max_update_norm",
            "bounds a head's distance from the round's head, which fedsgd (the default) never sends; set "
            "train.protocol: fedavg, or null",
            self.max_update_norm,
        )
        _require(1 <= self.local_epochs <= 1000, "train.local_epochs", "must be 1..1000", self.local_epochs)
        _require(self.batch_size >= 1, "train.batch_size", "must be >= 1", self.batch_size)
        _require(0 < self.learning_rate <= 100, "train.learning_rate", "must be in (0, 100]", self.learning_rate)
        _require(0 <= self.momentum < 1, "train.momentum", "must be in [0, 1)", self.momentum)
        _require(self.proximal_mu >= 0, "train.proximal_mu", "must be >= 0", self.proximal_mu)
        _require(self.server_learning_rate > 0, "train.server_learning_rate", "must be > 0", self.server_learning_rate)
        _require(0 <= self.trimmed_beta < 0.5, "train.trimmed_beta", "must be in [0, 0.5)", self.trimmed_beta)
        _require(
            self.max_update_norm is None or self.max_update_norm > 0,
            "train.max_update_norm",
            "must be > 0 (or null for no bound)",
            self.max_update_norm,
        )
        _require(0 < self.fraction_train <= 1, "train.fraction_train", "must be in (0, 1]", self.fraction_train)
        _require(self.min_sites >= 1, "train.min_sites", "must be >= 1", self.min_sites)
        _require(
            0 <= self.fraction_evaluate <= 1, "train.fraction_evaluate", "must be in [0, 1]", self.fraction_evaluate
        )
        _require(self.round_timeout_s > 0, "train.round_timeout_s", "must be > 0", self.round_timeout_s)
        _require(1 <= self.evaluate_every <= 10_000, "train.evaluate_every", "must be 1..10000", self.evaluate_every)

    def evaluates(self, rnd: int) -> bool:
        """Whether the model of round `rnd` is scored by the sites: every evaluate_every-th, and the last."""
        return self.fraction_evaluate > 0 and (rnd % self.evaluate_every == 0 or rnd == self.rounds)


@dataclass(frozen=True)
class PrivacyConfig:
    enabled: bool = True
    target_epsilon: float = 3.0
    target_delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: Literal["rdp", "prv"] = "prv"
    secure_mode: bool = False
    # record: ε protects one record. user: one person, all their records (sampling and clipping per user).
    unit: Literal["record", "user"] = "record"
    synthetic_users: int = 0  # unit user on mnist/digits only: group a site's records into users of this many
    # one Gaussian release per site of per-class feature sums and counts (round 0): a DP mean to centre features
    # and a class-mean start for the head, taking feature_stats_share of the budget (in the Gaussian's μ²)
    feature_stats: bool = True
    feature_stats_share: float = 0.2
    # without the statistics (feature_stats: false) round 0 under DP releases only per-class record counts, the
    # count behind a site's weight, fedavg's sample rate and fedsgd's q·n: its own share, since a count needs far
    # less precision than class means (client/dp_count.py)
    count_share: float = 0.02
    # local: a site's own noise gives its ε against everyone. distributed (fedsgd under secure_aggregation): each
    # site adds its share of discrete (Skellam) noise; the sum of the fewest sites SecAgg+ unmasks carries it all
    trust: Literal["local", "distributed"] = "local"
    # distributed trust: the sites that may reveal their own noise share to the coordinator (who subtracts it);
    # the shares are planned so the K_min − t honest ones carry the whole variance (docs/explanation/privacy.md)
    colluding_sites: int = 0
    # the evaluation release's budget over the run's federated evaluations (null: target_epsilon). Test and
    # training records are disjoint: by parallel composition it does not add to the training ε
    evaluation_epsilon: float | None = None

    @property
    def release_share(self) -> float | None:
        """The budget share (in the Gaussian's μ²) of round 0's release: the statistics, else the counts; None
        without DP (no release)."""
        if not self.enabled:
            return None
        return self.feature_stats_share if self.feature_stats else self.count_share

    @property
    def evaluation_budget(self) -> float:
        """ε of all of a site's evaluation releases in a run, together."""
        return self.target_epsilon if self.evaluation_epsilon is None else self.evaluation_epsilon

    def __post_init__(self) -> None:
        _require(
            self.evaluation_epsilon is None or 0 < self.evaluation_epsilon <= 100,
            "privacy.evaluation_epsilon",
            "must be in (0, 100] (or null: target_epsilon)",
            self.evaluation_epsilon,
        )
        _require(
            0 < self.feature_stats_share < 1,
            "privacy.feature_stats_share",
            "must be in (0, 1)",
            self.feature_stats_share,
        )
        _require(0 < self.count_share < 1, "privacy.count_share", "must be in (0, 1)", self.count_share)
        _require(
            0 <= self.synthetic_users <= 10_000, "privacy.synthetic_users", "must be 0..10000", self.synthetic_users
        )
        _require(0 < self.target_epsilon <= 100, "privacy.target_epsilon", "must be in (0, 100]", self.target_epsilon)
        _require(
            0 < self.target_delta < 1, "privacy.target_delta", "must be in (0, 1) and below 1/n", self.target_delta
        )
        _require(self.max_grad_norm > 0, "privacy.max_grad_norm", "must be > 0", self.max_grad_norm)
        _require(self.colluding_sites >= 0, "privacy.colluding_sites", "must be >= 0", self.colluding_sites)
