"""What a deployed site keeps on disk so that a new ClientApp process need not recompute it.

Flower 1.41 starts a new ClientApp process for every message, so the process cache
(common/encoders/process_cache.py) is empty at every round of a deployment. Two results are costly
and change only when their inputs do: the encoder's identity (building the backbone and
hashing its weights, only to announce and compare a fingerprint when the features are
already cached) and the DP plan (Opacus' noise calibration, a bisection over the
accountant). Each is kept as one small record in `state_dir/prepared/`.

When a record is used (otherwise it is recomputed from scratch and written again):
- Its key, everything the value depends on, equals what this process computes now: the
  backbone config and device, or the planner and its arguments; the SHA-256 of fedtransfer's
  `common/` sources; the versions of torch, torchvision, opacus and the text packages.
- Its MAC verifies: HMAC-SHA256 under the site's secret seed (`state_dir/secret-seed`,
  owner-only). A record edited by anyone who cannot read that file, or torn, is not trusted.
- Encoder records only: every weights file (the torchvision checkpoint or `weights_file`, a
  text model's folder, a table's schema) still has the recorded size and SHA-256, hashed
  again in every process (a long-lived site worker hashes a file again only once its device,
  inode, size, mtime or ctime changes: `known_sha256`). A changed file is another encoder.

A record skips work, never a check. The fingerprint a site announces is the recorded
fingerprint of the very files it would load; if the weights are needed after all (the
features are not cached), they are loaded and their fingerprint must equal the recorded one,
or the message is refused. A DP plan is still checked against the site's policy and, every
round, against its ledger (`PrivacyLedger.check_round`). `FEDTRANSFER_PREPARED_STATE=off` in
the SuperNode's environment turns records off (neither read nor written).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from logging import WARNING
from pathlib import Path
from typing import Any

import torch
from fedtransfer.common.config.catalog import CATALOG
from fedtransfer.common.config.run import BackboneConfig
from fedtransfer.common.encoders.interface import Encoder, EncoderError, file_sha256
from fedtransfer.common.privacy.plans import Plan, plan_from_record
from fedtransfer.common.storage import atomic
from flwr.common.logger import log

SWITCH_ENV = "FEDTRANSFER_PREPARED_STATE"  # "off": every process recomputes, as before this module existed
_PACKAGES = ("torch", "torchvision", "opacus", "sentence-transformers", "transformers")
MAX_RECORDS = 64  # a site keeps one encoder record and one plan per run shape; old ones are only litter
_COMMON = Path(__file__).resolve().parent.parent / "common"


@dataclass(frozen=True)
class PreparedState:
    """A site's records: `folder` (state_dir/prepared), MACed under its `secret` seed."""

    folder: Path
    secret: int

    @property
    def enabled(self) -> bool:
        return os.environ.get(SWITCH_ENV, "on").lower() not in ("off", "0", "false", "no")

    def read(self, what: str, key: dict[str, Any]) -> dict[str, Any] | None:
        """The value recorded under `key`, or None when there is none, or it fails its key or MAC check."""
        path = self._path(what, key)
        if not self.enabled or not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            body = _canonical({"key": record["key"], "value": record["value"]})
            trusted = hmac.compare_digest(str(record["mac"]), self._mac(body)) and record["key"] == json.loads(
                _canonical(key)
            )
        except (OSError, ValueError, KeyError, TypeError):
            trusted = False
        if not trusted:
            log(WARNING, "site prepared state: %s failed its check (torn, edited or stale); recomputing it", path)
            return None
        return record["value"]

    def write(self, what: str, key: dict[str, Any], value: dict[str, Any]) -> None:
        """Record `value` under `key`; past MAX_RECORDS (records of older code or runs) the oldest go."""
        if not self.enabled:
            return
        body = _canonical({"key": key, "value": value})
        atomic.write_text(self._path(what, key), json.dumps({"key": key, "value": value, "mac": self._mac(body)}))
        try:
            records = sorted(self.folder.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
        except OSError:  # another process of this site replaced one meanwhile: pruned next time
            return
        for old in records[: max(0, len(records) - MAX_RECORDS)]:
            old.unlink(missing_ok=True)

    def _path(self, what: str, key: dict[str, Any]) -> Path:
        return self.folder / f"{what}-{hashlib.sha256(_canonical(key).encode()).hexdigest()[:32]}.json"

    def _mac(self, body: str) -> str:
        return hmac.new(f"fedtransfer-prepared|{self.secret}".encode(), body.encode(), hashlib.sha256).hexdigest()


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@cache
def code_identity() -> dict[str, str]:
    """What the recorded values were computed with: our common/ sources and the packages that compute them."""
    h = hashlib.sha256()
    for path in sorted(_COMMON.glob("*.py")):
        h.update(f"{path.name}|".encode() + path.read_bytes())
    versions = {}
    for package in _PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "absent"
    return {"common": h.hexdigest()} | versions


# --- the encoder's identity ----------------------------------------------------------------------------


class PreparedEncoder:
    """An `Encoder` known by its recorded identity; its weights are loaded only if something needs them.

    Loaded weights whose fingerprint differs from the recorded one are refused (EncoderError).
    """

    def __init__(self, value: dict[str, Any], device: str, load: Callable[[], Encoder]) -> None:
        self.name, self.kind = str(value["name"]), str(value["kind"])
        self.feature_dim, self.fingerprint = int(value["feature_dim"]), str(value["fingerprint"])
        self.device = torch.device(device)
        self._description = dict(value["description"])
        self._load, self._loaded = load, None

    @property
    def loaded(self) -> bool:
        return self._loaded is not None

    def describe(self) -> dict[str, Any]:
        return dict(self._description)

    def embed(self, inputs: Any) -> torch.Tensor:
        return self._encoder().embed(inputs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._encoder().state_dict()

    def _encoder(self) -> Encoder:
        if self._loaded is None:
            loaded = self._load()
            if loaded.fingerprint != self.fingerprint or loaded.describe() != self._description:
                raise EncoderError(
                    f"backbone {self.name}: the weights loaded now (fingerprint "
                    f"{loaded.fingerprint[:16]}…) are not the ones this site prepared "
                    f"({self.fingerprint[:16]}…); retry the round"
                )
            self._loaded = loaded
        return self._loaded


def site_encoder(cfg: BackboneConfig, device: str, state: PreparedState, load: Callable[[], Encoder]) -> Encoder:
    """The site's encoder: a `PreparedEncoder` when a verified record names it, else `load()` (then recorded)."""
    key = {"backbone": asdict(cfg), "device": device, "hub": torch.hub.get_dir()} | code_identity()
    value = state.read("encoder", key)
    if value is not None and _unchanged(value.get("files")):
        return PreparedEncoder(value, device, load)
    sources = weight_sources(cfg) if state.enabled else None
    files = None if sources is None else _identities(sources)  # hashed before loading: a race errs to stale
    encoder = load()
    if files is not None:
        state.write(
            "encoder",
            key,
            {
                "name": encoder.name,
                "kind": encoder.kind,
                "feature_dim": encoder.feature_dim,
                "fingerprint": encoder.fingerprint,
                "description": encoder.describe(),
                "files": files,
            },
        )
    return encoder


def weight_sources(cfg: BackboneConfig) -> list[Path] | None:
    """The files an encoder of `cfg` is built from; None when it has none to pin (random weights: not kept)."""
    kind = CATALOG[cfg.name].kind
    if kind == "tabular":
        return [Path(str(cfg.schema)).expanduser()]
    if kind == "text":
        from fedtransfer.common.encoders.text import packaged_folder

        where = Path(cfg.weights_file).expanduser() if cfg.weights_file else packaged_folder(cfg.name)
        folder = where if where.is_dir() else where.parent
        return sorted(p for p in folder.rglob("*") if p.is_file())
    if cfg.weights_file:
        return [Path(cfg.weights_file).expanduser()]
    if cfg.weights.lower() == "none":
        return None
    import torchvision
    from fedtransfer.common.encoders.image import hub_checkpoint_path

    return [hub_checkpoint_path(torchvision.models.get_model_weights(cfg.name)[cfg.weights])]


def _identities(paths: list[Path]) -> list[list[str | int]] | None:
    """[path, size, SHA-256] of each file; None if one is missing (loading will say why, or fetch it)."""
    try:
        return [[str(p.resolve()), p.stat().st_size, file_sha256(p)] for p in paths]
    except OSError:
        return None


def _unchanged(files: object) -> bool:
    """Every recorded weights file still has its recorded size and SHA-256."""
    if not isinstance(files, list) or not files:
        return False
    try:
        return all(os.stat(path).st_size == size and known_sha256(Path(path)) == digest for path, size, digest in files)
    except (OSError, TypeError, ValueError):
        return False


# What this process has hashed: (path, device, inode, size, mtime_ns, ctime_ns) -> SHA-256. A file written within
# RACY_NS of being hashed is not kept: timestamps tick coarsely (a few ms), so a second write in the same tick
# could leave its stat unchanged (git's "racy" rule). ctime cannot be set back by a user, unlike mtime.
_DIGESTS: dict[tuple[str, int, int, int, int, int], str] = {}
MAX_DIGESTS = 4096
RACY_NS = 2_000_000_000


def known_sha256(path: Path) -> str:
    """`file_sha256(path)`, hashed again only when the file's stat changed since this process last hashed it.

    The site worker answers every message in one process: the 14 MB MobileNetV2 checkpoint was hashed
    per message, though only a changed file can change its digest.
    """
    before = os.stat(path)
    key = (str(path), before.st_dev, before.st_ino, before.st_size, before.st_mtime_ns, before.st_ctime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    digest = file_sha256(path)
    after = os.stat(path)
    stable = (after.st_ino, after.st_size, after.st_mtime_ns, after.st_ctime_ns) == key[2:]
    if stable and time.time_ns() - max(after.st_mtime_ns, after.st_ctime_ns) > RACY_NS:
        if len(_DIGESTS) >= MAX_DIGESTS:
            _DIGESTS.clear()
        _DIGESTS[key] = digest
    return digest


# --- the DP plan ---------------------------------------------------------------------------------------


def remembered_plan(state: PreparedState, planner: Callable[..., Plan], arguments: dict[str, Any]) -> Plan:
    """`planner(**arguments)` (plan_dp, plan_fedsgd, plan_distributed: pure functions of public numbers), computed
    once per site. The key names the arguments (`kwargs`), so records of the positional planners before them
    (`args`) are never read as these; a record of another plan shape is recomputed."""
    key = {"planner": f"{planner.__module__}.{planner.__qualname__}", "kwargs": arguments} | code_identity()
    value = state.read("plan", key)
    if value is not None:
        try:
            return plan_from_record(value)
        except TypeError:
            pass  # a record of another plan shape: recomputed below
    plan = planner(**arguments)
    state.write("plan", key, plan.as_record())
    return plan
