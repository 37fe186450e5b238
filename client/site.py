"""Who this ClientApp is: its data, its disk, its encoder and its own privacy policy.

In a simulation a site is a partition of the configured source (node config
`partition-id`). In a deployment it is whatever the site's own YAML file says (node
config `site-config`): data path, device, state folder and the policy the server's run
config must stay within. What a process keeps between rounds (encoders, the simulated
split, every site it has played) lives in one bounded cache, `PROCESS_CACHE`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from fedtransfer.client.prepared import PreparedState, remembered_plan, site_encoder
from fedtransfer.common.config.run import RunConfig, SitePolicy, load_site_config
from fedtransfer.common.config.site import site_paths
from fedtransfer.common.data.federation import deployed_site_data, federation_for
from fedtransfer.common.data.sources import SiteData
from fedtransfer.common.encoders.devices import resolve_device
from fedtransfer.common.encoders.feature_cache import cached_features
from fedtransfer.common.encoders.interface import Encoder
from fedtransfer.common.encoders.process_cache import ProcessCache, nbytes
from fedtransfer.common.privacy.plans import Plan
from fedtransfer.common.privacy.policy import DPSettings, PolicyUse, policy_violations
from flwr.app import Context


class Declined(RuntimeError):
    """The site will not do what the server asked; the reason goes back to the server."""


@dataclass(frozen=True)
class Site:
    name: str
    data: SiteData
    backbone: Encoder  # only the Encoder interface: name, fingerprint, feature_dim, device
    state_dir: Path
    secret_seed: int  # seeds batch sampling and noise; never leaves the site
    policy: SitePolicy | None  # None in simulation: there the run config is the site's own
    accept_app_version: str | None
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    simulated: bool = False
    prepared: PreparedState | None = None  # deployed sites: what earlier processes computed (client/prepared.py)
    policy_file: Path | None = None  # the site's own config file its policy came from (named when it refuses)

    def plan(self, planner: Callable[..., Plan], **arguments: Any) -> Plan:
        """`planner(**arguments)` (a mechanism's planner), from the site's records when it has one."""
        if self.prepared is None:
            return planner(**arguments)
        return remembered_plan(self.prepared, planner, arguments)

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


# The one cache of this process (a simulation actor plays many sites, a SuperNode answers many
# rounds): encoders, the simulated federation's split, and each site played (its data and features).
# 4 GiB holds the 5,000-digit demo's pool and features about 50 times over.
PROCESS_CACHE = ProcessCache(max_entries=4096, max_bytes=4 << 30)


def get_site(context: Context, cfg: RunConfig, cache: ProcessCache = PROCESS_CACHE) -> Site:
    """This node's site for the run `cfg`, built once and then served from `cache`."""
    node = dict(context.node_config)
    key = (
        "site",
        tuple(sorted(node.items())),
        cfg.backbone,
        cfg.data,
        cfg.seed,
        cfg.device,
        cfg.output_dir,
        cfg.cache_dir,
        cfg.finetune.blocks if cfg.finetune.active else 0,
    )
    if "site-config" in node:
        return cache.get(key, lambda: _deployed_site(node, cfg, cache))
    return cache.get(key, lambda: _simulated_site(node, cfg, cache))


def _encoder(cfg: RunConfig, device: str, cache: ProcessCache) -> Encoder:
    """One frozen encoder per configuration and device: a simulation actor plays many sites that all use it."""
    from fedtransfer.common.encoders.registry import (
        load_encoder,  # here: a prepared deployed site never imports torchvision
    )
    from fedtransfer.common.model.finetune import (
        cut_encoder,  # the encoder itself, or cut below the blocks that train (finetune)
    )

    return cache.get(
        ("encoder", cfg.backbone, cfg.finetune.blocks if cfg.finetune.active else 0, device),
        lambda: cut_encoder(load_encoder(cfg.backbone, device), cfg.finetune),
        lambda encoder: nbytes(encoder.state_dict()),
    )


def _simulated_site(node: dict, cfg: RunConfig, cache: ProcessCache) -> Site:
    if "partition-id" not in node:
        raise Declined("node config has neither site-config (deployment) nor partition-id (simulation)")
    pid, count = int(node["partition-id"]), int(node["num-partitions"])  # one site per SuperNode
    # one split per process: every simulated site would otherwise reload and re-split the whole pool
    split_key = ("federation", cfg.data, cfg.backbone.image_size, cfg.seed, count)
    data = cache.get(split_key, lambda: federation_for(cfg, count)).sites[pid]
    device = resolve_device(cfg.device)
    return _make_site(
        data,
        _encoder(cfg, device, cache),
        cfg.output_path / "sites" / data.name,
        cfg.cache_path,
        secret_seed=cfg.seed * 1000 + pid,
        simulated=True,
    )


def _deployed_site(node: dict, cfg: RunConfig, cache: ProcessCache) -> Site:
    config = Path(str(node["site-config"])).expanduser()
    sc = load_site_config(config)
    paths = site_paths(sc, config)
    # data.classes is the run's public class order (text): every site labels its records by it, as the server does
    data = deployed_site_data(sc, paths, cfg.backbone.image_size, classes=cfg.data.class_names)
    if paths.schema is not None:  # a table's encoder follows the site's own schema copy; fingerprints must agree
        cfg = replace(cfg, backbone=replace(cfg.backbone, schema=str(paths.schema)))
    device, secret = resolve_device(sc.device), _secret_seed(paths.state_dir)
    # Flower starts a process per message: the encoder's identity comes from the site's records when they
    # hold it, and its weights load only if the features are not cached (client/prepared.py)
    prepared = PreparedState(paths.state_dir / "prepared", secret)
    # a fine-tuning site needs the encoder's weights above the cut every round: no prepared stand-in
    encoder = (
        _encoder(cfg, device, cache)
        if cfg.finetune.active
        else site_encoder(cfg.backbone, device, prepared, lambda: _encoder(cfg, device, cache))
    )
    return _make_site(
        data,
        encoder,
        paths.state_dir,
        paths.cache_dir,
        secret_seed=secret,
        policy=sc.policy,
        accept_app_version=sc.accept_app_version,
        prepared=prepared,
        policy_file=config,
    )


def _make_site(
    data: SiteData,
    encoder: Encoder,
    state_dir: Path,
    cache_dir: Path,
    *,
    secret_seed: int,
    policy: SitePolicy | None = None,
    accept_app_version: str | None = None,
    simulated: bool = False,
    prepared: PreparedState | None = None,
    policy_file: Path | None = None,
) -> Site:
    train_x, _ = cached_features(encoder, data.train, cache_dir)
    test_x, _ = cached_features(encoder, data.test, cache_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    return Site(
        data.name,
        data,
        encoder,
        state_dir,
        secret_seed,
        policy,
        accept_app_version,
        train_x,
        torch.from_numpy(data.train.labels),
        test_x,
        torch.from_numpy(data.test.labels),
        simulated,
        prepared,
        policy_file,
    )


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


def enforce_policy(
    policy: SitePolicy | None,
    cfg: RunConfig,
    plan: Plan | None,
    spent_other_runs: float,
    *,
    distributed: bool = False,
    policy_file: Path | None = None,
) -> None:
    """Refuse a plan that would exceed the site's own limits, naming the limit (common/privacy/policy.py) and
    the site's config file it is set in (`policy_file`, when known).

    `distributed`: the run's mechanism adds only a share of the noise (a policy may refuse that, or require that
    it hold against some sites revealing their shares: policy.min_colluding_sites).
    """
    if policy is None:
        return
    scope = f"privacy.target_epsilon of this run plus ε {spent_other_runs:.3g} already spent in earlier runs"
    use = PolicyUse(
        rounds=cfg.train.rounds,
        without_dp=plan is None,
        plain_aggregation=not cfg.secure_aggregation,
        delta=None if plan is None else plan.target_delta,
        epsilon=0.0 if plan is None else plan.target_epsilon,
        epsilon_earlier=0.0 if plan is None else spent_other_runs,
        epsilon_scope=scope,
        trainings=() if plan is None else (DPSettings("the plan", plan.noise_multiplier, plan.max_grad_norm),),
        distributed_trust=distributed,
        colluding_sites=cfg.privacy.colluding_sites,
    )
    if violations := policy_violations(policy, use):
        # the file's name only: the refusal goes to the coordinator, the site's paths stay home
        where = "" if policy_file is None else f" ({policy_file.name})"
        raise Declined(f"site policy{where}: {'; '.join(violations)}")
