"""The Flower app that `flwr run` submits: this checkout, or for an installed fedtransfer, a pyproject.toml.

`flwr run DIR` reads DIR/pyproject.toml ([project], [tool.flwr.app]: the components and the embedded
default run) and ships DIR as the FAB. In a checkout that file is the repository's own. An installed
wheel has no checkout, so its app folder is written from what the wheel holds: the components' import
paths and the embedded default run, which is RunConfig's defaults (tests keep the checkout's
[tool.flwr.app.config] equal to them). That FAB holds no code: the ServerApp and ClientApp import the
installed package, the one this command runs.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import tomli_w
from fedtransfer.common.config.run import RunConfig, to_nested
from fedtransfer.common.storage import atomic

CHECKOUT = Path(__file__).resolve().parents[2]
COMPONENTS = {
    "serverapp": "fedtransfer.server.federation.server_app:app",
    "clientapp": "fedtransfer.client.client_app:app",
}


def is_checkout(folder: Path) -> bool:
    """A source tree whose pyproject.toml declares this Flower app (not site-packages)."""
    project = folder / "pyproject.toml"
    return project.is_file() and "[tool.flwr.app]" in project.read_text(encoding="utf-8")


def app_folder(cache_dir: Path) -> Path:
    """The folder to `flwr run`: the checkout, else `cache_dir/flower-app/<version>/` written for this install."""
    if is_checkout(CHECKOUT):
        return CHECKOUT
    version = importlib.metadata.version("fedtransfer")
    folder = cache_dir / "flower-app" / version
    project = {
        "project": {"name": "fedtransfer", "version": version, "description": "fedtransfer's Flower app"},
        "tool": {
            "flwr": {"app": {"publisher": "fedtransfer", "components": COMPONENTS, "config": to_nested(RunConfig())}}
        },
    }
    text = tomli_w.dumps(project)
    path = folder / "pyproject.toml"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        folder.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, text)
    return folder
