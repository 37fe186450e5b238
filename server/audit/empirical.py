"""Empirical privacy test: train a site's head with canaries, attack it, bound ε from below.

The accountant's ε is a proof about the *algorithm*; this test checks the *code*. It
replays the run's own mechanism (`mechanism_for(cfg)`: its plan, its statistics release, every round and
local epoch of the run; server/audit/empirical_replay.py) on the site's features plus m canaries, each
included independently with probability 1/2, then
scores every canary with a membership-inference attack on the trained head and turns
the attack's success into a lower bound on ε that holds with the stated confidence
(one-run method, `server/audit/empirical_stats.py`). If the bound exceeds the ε the
accountant claims, the implementation does not deliver the DP it claims.

Canaries are random unit directions with random labels. The head L2-normalises its
input, so every canary has the same norm as real data, and in a feature space of
hundreds of dimensions random directions are nearly orthogonal to the data and to each
other: only memorising a canary moves its score, which a non-private head does and a
DP head (clipped, noised) cannot do much of. A positive control trains the same way
without noise or clipping, showing the attack is strong enough to catch a broken run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from fedtransfer.common.config.parse import ConfigError
from fedtransfer.common.config.run import RunConfig, SiteConfig
from fedtransfer.common.config.site import site_paths
from fedtransfer.common.data.federation import deployed_site_data, federation_for
from fedtransfer.common.data.sources import SiteData
from fedtransfer.common.encoders.feature_cache import cached_features
from fedtransfer.common.encoders.interface import Encoder
from fedtransfer.common.encoders.registry import load_encoder
from fedtransfer.common.errors import InputError
from fedtransfer.common.privacy.mechanisms import mechanism_for
from fedtransfer.common.privacy.plans import Plan, SkellamPlan
from fedtransfer.common.progress import Progress
from fedtransfer.server.audit.empirical_replay import (
    Message,
    canary_units,
    replay_epsilon,
    replay_plan,
    replay_run,
)
from fedtransfer.server.audit.empirical_stats import audit_from_scores
from fedtransfer.server.audit.findings import AuditReport, EmpiricalResult, Evidence, Failure, SiteAudit
from torch import nn

GUESS_FRACTIONS = (0.05, 0.1, 0.25, 0.5)  # k = fraction × m; Bonferroni over these four


@dataclass(frozen=True)
class CanarySettings:
    """How the test is run: canaries, confidence of the bound, randomness."""

    num_canaries: int = 1000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_canaries < 2:
            raise InputError(f"--canaries must be at least 2 (got {self.num_canaries})")
        if not 0.0 < self.confidence < 1.0:
            raise InputError(f"--confidence must be in (0, 1) (got {self.confidence})")

    @property
    def guess_counts(self) -> list[int]:
        half = self.num_canaries // 2
        return sorted({min(half, max(1, round(f * self.num_canaries))) for f in GUESS_FRACTIONS})


def make_canaries(
    feature_dim: int, num_classes: int, count: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random unit directions with uniformly random labels."""
    directions = rng.standard_normal((count, feature_dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    labels = rng.integers(0, num_classes, size=count)
    return torch.from_numpy(directions.astype(np.float32)), torch.from_numpy(labels.astype(np.int64))


@torch.no_grad()
def canary_scores(head: nn.Module, canaries: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """How far the head has moved each canary towards its label (higher = more likely trained on).

    The logits of the zero input (the bias alone) are subtracted, and the canary's label logit
    is compared with the mean logit: what is left is the head's response along the canary's own
    direction, which is exactly what a gradient step on that canary changes.
    """
    head.eval()
    device = next(head.parameters()).device
    logits = head(canaries.to(device)) - head(torch.zeros(1, canaries.shape[1], device=device))
    own = logits.gather(1, labels.to(device)[:, None]).squeeze(1)
    return (own - logits.mean(1)).cpu().numpy().astype(float)


def audit_training(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    cfg: RunConfig,
    settings: CanarySettings,
    *,
    private: bool = True,
    claimed_epsilon: float | None = None,
    on_round: Callable[[], None] | None = None,
    users: np.ndarray | None = None,
    message: Message = "aggregate",
) -> EmpiricalResult:
    """Train as the site would (the run's own mechanism and plan, empirical_replay.py), with canaries mixed in,
    and bound ε from the attack's success.

    With `private`, the run's DP plan is used and the claim defaults to the ε the accountant gives
    for this very training (against the aggregate, or under distributed trust against the site's
    own `message`). Without it (the positive control, or a deliberately broken configuration) the
    head trains the same protocol with no noise or clipping and `claimed_epsilon` is what a run would
    have claimed. `on_round` is called after each round's training (progress); `users`: the real records'
    person codes under privacy.unit: user, when the data names them.
    """
    if private and not cfg.privacy.enabled:
        raise ConfigError("privacy.enabled is false: the run claims no differential privacy to audit")
    canaries, canary_labels, included, x, y = _with_canaries(features, labels, num_classes, settings)
    units = canary_units(len(labels), len(y), cfg, users)
    plan = replay_plan(cfg, units, feature_dim=x.shape[1], num_classes=num_classes) if private else None
    run = replay_run(x, y, units, num_classes, cfg, plan, seed=settings.seed, message=message, on_round=on_round)
    if plan is not None and claimed_epsilon is None:
        claimed_epsilon = replay_epsilon(cfg, run.history, message)
    scores = canary_scores(run.head, canaries, canary_labels)
    audit = partial(
        audit_from_scores,
        included=included,
        delta=cfg.privacy.target_delta,
        confidence=settings.confidence,
        guess_counts=settings.guess_counts,
    )
    result, perfect = audit(scores), audit(included.astype(float))
    return EmpiricalResult(
        private=private,
        claimed_epsilon=claimed_epsilon,
        delta=cfg.privacy.target_delta,
        eps_lower_bound=result.eps_lower_bound,
        eps_ceiling=perfect.eps_lower_bound,
        confidence=settings.confidence,
        num_canaries=settings.num_canaries,
        num_included=int(included.sum()),
        best_k=result.best_k,
        num_guesses=result.num_guesses,
        num_correct=result.num_correct,
        noise_multiplier=plan.noise_multiplier if plan else None,
        steps=run.steps,
        scores_in=scores[included].tolist(),
        scores_out=scores[~included].tolist(),
        mechanism=_mechanism_name(cfg, plan, message),
    )


def _with_canaries(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, settings: CanarySettings
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, torch.Tensor, torch.Tensor]:
    """The canaries, which of them are trained on (each by a fair coin), and the real records with those mixed in."""
    rng = np.random.default_rng(settings.seed)
    canaries, canary_labels = make_canaries(features.shape[1], num_classes, settings.num_canaries, rng)
    included = rng.random(settings.num_canaries) < 0.5
    x = torch.cat([features.float().cpu(), canaries[torch.from_numpy(included)]])
    y = torch.cat([labels.long().cpu(), canary_labels[torch.from_numpy(included)]])
    return canaries, canary_labels, included, x, y


def _mechanism_name(cfg: RunConfig, plan: Plan | None, message: Message) -> str:
    """What the replay ran, for the report: protocol, trust and noise, and what the coordinator saw."""
    if plan is None:
        return f"{cfg.train.protocol}, no noise, no clipping (control)"
    if isinstance(plan, SkellamPlan):
        seen = "the site's own message" if message == "own" else "the SecAgg+ aggregate"
        return f"{cfg.train.protocol}, distributed trust, integers + Skellam: {seen}"
    return f"{cfg.train.protocol}, local trust, Gaussian"


@dataclass(frozen=True)
class SiteFeatures:
    """A site's training set as its head sees it: cached backbone features and labels."""

    name: str
    features: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    users: np.ndarray | None = None  # each record's person code (Samples.user_codes) when the data names them


def simulated_sites(cfg: RunConfig) -> list[SiteFeatures]:
    """Every simulated site's training split, rebuilt from the run's config (same seed, same split)."""
    fed = federation_for(cfg)
    encoder = load_encoder(cfg.backbone, "cpu")
    return [_features(encoder, site, cfg.cache_path) for site in fed.sites]


def deployed_site(cfg: RunConfig, site: SiteConfig, config_path: Path) -> SiteFeatures:
    """A deployed site's training split, read from its own data as client/site.py does (same split seed)."""
    paths = site_paths(site, config_path)
    data = deployed_site_data(site, paths, cfg.backbone.image_size, classes=cfg.data.class_names)
    return _features(load_encoder(cfg.backbone, "cpu"), data, paths.cache_dir)


def _features(encoder: Encoder, data: SiteData, cache_dir: Path) -> SiteFeatures:
    features, _ = cached_features(encoder, data.train, cache_dir)
    labels = torch.from_numpy(data.train.labels)
    users = None if data.train.users is None else data.train.user_codes()
    return SiteFeatures(data.name, features, labels, len(data.train.classes), users)


def with_target(cfg: RunConfig, target_epsilon: float) -> RunConfig:
    """The same run, planned for another ε (the benchmark sweeps it)."""
    return replace(cfg, privacy=replace(cfg.privacy, target_epsilon=target_epsilon))


def run_empirical(
    report: AuditReport, ev: Evidence, configs: dict[str, tuple[SiteConfig, Path]], settings: CanarySettings
) -> None:
    """The canary test for each site whose data is at hand, and the positive control without DP."""
    report.empirical_settings = asdict(settings) | {"guess_counts": settings.guess_counts}
    if ev.cfg is None or not ev.cfg.privacy.enabled:
        report.notes.append("empirical test skipped: the run claims no differential privacy")
        return
    cfg = ev.cfg
    if cfg.finetune.active:  # canaries are unit feature vectors for the head; a top's inputs are cut activations
        report.notes.append(
            f"empirical test skipped: it trains the head on features, this run trained encoder "
            f"blocks too (finetune.train: {cfg.finetune.train}); the analytic checks still apply"
        )
        return
    data = {s.name: s for s in simulated_sites(cfg)} if ev.simulation else {}
    data |= {name: deployed_site(cfg, config, path) for name, (config, path) in configs.items()}
    for site in report.sites:
        if site.name not in data:
            report.notes.append(f"empirical test skipped for {site.name}: its data is not here (--site-config)")
    tested = [site for site in report.sites if site.name in data]
    # each site trains twice (with DP, and the control without; thrice under distributed trust: its own message
    # too), every round of the run
    trainings = 3 if mechanism_for(cfg).distributed else 2
    with Progress("empirical test", trainings * len(tested) * cfg.train.rounds, "rounds") as progress:
        for site in tested:
            _test_site(site, data[site.name], cfg, settings, progress)
            _judge(site, report, str(ev.config_path))


def _test_site(site: SiteAudit, d: SiteFeatures, cfg: RunConfig, settings: CanarySettings, progress: Progress) -> None:
    """The canary training with the run's mechanism and plan, the same without DP (the positive control), and
    under distributed trust the site's own message against its own-message ε."""
    run = partial(audit_training, d.features, d.labels, d.num_classes, cfg, settings, users=d.users)
    site.empirical = result = run(on_round=progress.step)
    progress.stage_done(f"{site.name} with DP")
    site.control = run(private=False, claimed_epsilon=result.claimed_epsilon, on_round=progress.step)
    progress.stage_done(f"{site.name} control without DP")
    if mechanism_for(cfg).distributed:
        site.own_message = run(message="own", on_round=progress.step)
        progress.stage_done(f"{site.name} own message")


def _judge(site: SiteAudit, report: AuditReport, config_path: str) -> None:
    """A bound above the claim fails the audit; a control too weak to catch a broken run is a note."""
    result, control = site.empirical, site.control
    assert result is not None and control is not None
    for tested, what in ((result, "claimed ε"), (site.own_message, "claimed ε against its own message")):
        if tested is not None and tested.exceeds_claim:
            reason = f"{site.name}: empirical ε lower bound {tested.eps_lower_bound:.3f} > {what}"
            report.failures.append(
                Failure(
                    "empirical",
                    config_path,
                    None,
                    f"{reason} {tested.claimed_epsilon:.3f} at {tested.confidence:.0%} "
                    f"confidence ({tested.mechanism}): the DP implementation is broken",
                )
            )
    if not control.exceeds_claim:
        weak = f"without DP the attack only proved ε ≥ {control.eps_lower_bound:.3f}"
        ceiling = f"at most {result.eps_ceiling:.3f} is provable with {result.num_canaries} canaries"
        report.notes.append(f"{site.name}: {weak} ({ceiling}): too weak to catch a broken run; add canaries")
