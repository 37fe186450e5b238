"""Who this ClientApp is: its data, its disk, its backbone and its own privacy policy.

In a simulation a site is a partition of the configured source (node config
`partition-id`). In a deployment it is whatever the site's own YAML file says (node
config `site-config`): data path, device, state folder and the policy the server's run
config must stay within.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import Context

from common.backbones import ImageBackbone, load_backbone, resolve_device
from common.config import BackboneConfig, RunConfig, SitePolicy, load_site_config
from common.data import SiteData, federation_for, load_source, site_split
from common.features import cached_features
from common.privacy import DPPlan


class Declined(RuntimeError):
    """The site will not do what the server asked; the reason goes back to the server."""


@dataclass
class Site:
    name: str
    data: SiteData
    backbone: ImageBackbone
    state_dir: Path
    secret_seed: int  # seeds batch sampling and noise; never leaves the site
    policy: SitePolicy | None  # None in simulation: there the run config is the site's own
    accept_app_version: str | None
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    simulated: bool = False

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "privacy-ledger.json"

    @property
    def replies_dir(self) -> Path:
        return self.state_dir / "replies"

    @property
    def audit_path(self) -> Path:
        return self.state_dir / "audit.jsonl"

    def round_seed(self, run_id: str, server_round: int) -> int:
        """Stable across processes (unlike hash()), unknowable without the site's secret.

        A deployed site mixes in the run id so two runs never reuse noise. A simulated site
        does not: its seed is the config's anyway, and the same config must give the same
        model whatever random run id the coordinator drew (also across a resume).
        """
        run = "" if self.simulated else run_id
        digest = hashlib.sha256(f"{self.secret_seed}|{run}|{server_round}".encode()).digest()
        return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


_SITES: dict[tuple, Site] = {}  # a simulation actor or SuperNode process serves many rounds


def get_site(context: Context, cfg: RunConfig) -> Site:
    node = dict(context.node_config)
    key = (tuple(sorted(node.items())), cfg.backbone, cfg.data, cfg.seed, cfg.output_dir)
    if key not in _SITES:
        _SITES[key] = _deployed_site(node, cfg) if "site-config" in node else _simulated_site(node, cfg)
    return _SITES[key]


@functools.lru_cache(maxsize=2)
def _backbone(cfg: BackboneConfig, device: str) -> ImageBackbone:
    """One frozen backbone per process: a simulation actor plays many sites that all use it."""
    return load_backbone(cfg, device)


# One split per process: every simulated site would otherwise reload and re-split the whole pool.
_federation = functools.lru_cache(maxsize=2)(federation_for)


def _simulated_site(node: dict, cfg: RunConfig) -> Site:
    if "partition-id" not in node:
        raise Declined("node config has neither site-config (deployment) nor partition-id (simulation)")
    pid, count = int(node["partition-id"]), int(node["num-partitions"])  # one site per SuperNode
    fed = _federation(cfg, count)
    data = fed.sites[pid]
    state_dir = cfg.output_path / "sites" / data.name
    site = _make_site(
        data, cfg, resolve_device(cfg.device), state_dir, cfg.cache_path, cfg.seed * 1000 + pid, None, None
    )
    site.simulated = True
    return site


def _deployed_site(node: dict, cfg: RunConfig) -> Site:
    config = Path(str(node["site-config"])).expanduser()
    sc = load_site_config(config)

    def local(path: str) -> Path:
        """Relative paths in a site config mean relative to that file, not to where Flower runs us."""
        return (config.parent / Path(path).expanduser()).resolve()

    pool = load_source(sc.data_source, str(local(sc.data_path)) if sc.data_path else None, cfg.backbone.image_size)
    data = site_split(pool, sc.name, sc.test_fraction, seed=0)  # fixed: a site's test split never moves
    state_dir = local(sc.state_dir)
    cache = local(sc.cache_dir) if sc.cache_dir else state_dir / "features"
    return _make_site(
        data,
        cfg,
        resolve_device(sc.device),
        state_dir,
        cache,
        _secret_seed(state_dir),
        sc.policy,
        sc.accept_app_version,
    )


def _make_site(
    data: SiteData,
    cfg: RunConfig,
    device: str,
    state_dir: Path,
    cache_dir: Path,
    seed: int,
    policy: SitePolicy | None,
    accept_app_version: str | None,
) -> Site:
    backbone = _backbone(cfg.backbone, device)
    train_x, _ = cached_features(backbone, data.train, cache_dir)
    test_x, _ = cached_features(backbone, data.test, cache_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    return Site(
        data.name, data, backbone, state_dir, seed, policy, accept_app_version,
        train_x, torch.from_numpy(data.train.labels), test_x, torch.from_numpy(data.test.labels),
    )  # fmt: skip


def _secret_seed(state_dir: Path) -> int:
    """A per-site random seed, created once with owner-only permissions and kept on disk.

    DP noise must be unpredictable to everyone else, yet a site that restarts should
    reproduce its own rounds; a local secret gives both.
    """
    path = state_dir / "secret-seed"
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(str(int.from_bytes(os.urandom(8), "big")))
    return int(path.read_text().strip())


def enforce_policy(policy: SitePolicy | None, cfg: RunConfig, plan: DPPlan | None, spent_other_runs: float) -> None:
    """Refuse a plan that would exceed the site's own limits, naming the limit."""
    if policy is None:
        return
    if plan is None:
        if policy.require_dp:
            raise Declined("site policy requires differential privacy, but the run has privacy.enabled: false")
        return
    checks = [
        (
            cfg.train.rounds <= policy.max_rounds,
            f"train.rounds {cfg.train.rounds} > policy.max_rounds {policy.max_rounds}",
        ),
        (
            plan.target_delta <= policy.max_delta,
            f"privacy.target_delta {plan.target_delta:g} > policy.max_delta {policy.max_delta:g}",
        ),
        (
            plan.target_epsilon + spent_other_runs <= policy.max_epsilon + 1e-9,
            f"privacy.target_epsilon {plan.target_epsilon:g} plus ε {spent_other_runs:.3g} already spent in earlier "
            f"runs > policy.max_epsilon {policy.max_epsilon:g}",
        ),
        (
            plan.noise_multiplier >= policy.min_noise_multiplier,
            f"noise multiplier {plan.noise_multiplier:.3g} < policy.min_noise_multiplier "
            f"{policy.min_noise_multiplier:g}",
        ),
        (
            plan.max_grad_norm <= policy.max_clip_norm,
            f"privacy.max_grad_norm {plan.max_grad_norm:g} > policy.max_clip_norm {policy.max_clip_norm:g}",
        ),
    ]
    for ok, reason in checks:
        if not ok:
            raise Declined(f"site policy: {reason}")
