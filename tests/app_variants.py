"""Copies of this Flower app with a test component in place of the ServerApp or ClientApp (tests only)."""

from __future__ import annotations

import shutil
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent.parent  # the Flower app `flwr run .` ships: the repository root
# what the FAB needs: the package's __init__ (it puts the copied folders first on its __path__) and the apps' code
PACKAGE_FOLDERS = ("fedtransfer", "server", "client", "common")
SERVERAPP, CLIENTAPP = "fedtransfer.server.federation.server_app:app", "fedtransfer.client.client_app:app"


def app_variant(dest: Path, module: Path, *, serverapp: str | None = None, clientapp: str | None = None) -> Path:
    """Copy the app to `dest` with `module` beside it and the named components replaced."""
    for package in PACKAGE_FOLDERS:
        shutil.copytree(APP_DIR / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(module, dest / module.name)
    shutil.copy(APP_DIR / "README.md", dest / "README.md")
    project = (APP_DIR / "pyproject.toml").read_text()
    assert f'serverapp = "{SERVERAPP}"' in project and f'clientapp = "{CLIENTAPP}"' in project
    if serverapp:
        project = project.replace(f'serverapp = "{SERVERAPP}"', f'serverapp = "{serverapp}"')
    if clientapp:
        project = project.replace(f'clientapp = "{CLIENTAPP}"', f'clientapp = "{clientapp}"')
    assert "\nfab-include = [" in project  # the FAB holds the listed code only: the test module joins it
    project = project.replace("\nfab-include = [", f'\nfab-include = ["{module.name}", ', 1)
    (dest / "pyproject.toml").write_text(project)
    return dest
