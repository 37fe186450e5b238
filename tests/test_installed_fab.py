"""A forked ClientApp skips unpacking a FAB its site already installed and verified (deploy/installed_fab.py)."""

from __future__ import annotations

from pathlib import Path

import flwr.cli.install
import flwr.common.config
import pytest
from fedtransfer.deploy import installed_fab
from fedtransfer.deploy.installed_fab import MARKER, install_once
from flwr.cli.build import build_fab_from_disk
from flwr.supernode.runtime import run_clientapp

_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tinyapp"
version = "1.0.0"
license = "Apache-2.0"

[tool.flwr.app]
publisher = "sitetest"

[tool.flwr.app.components]
serverapp = "tinyapp.apps:server"
clientapp = "tinyapp.apps:client"
"""


def _fab(tmp_path: Path, body: str) -> bytes:
    app = tmp_path / f"app-{abs(hash(body))}"
    (app / "tinyapp").mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(_PYPROJECT)
    (app / "tinyapp" / "__init__.py").write_text("")
    (app / "tinyapp" / "apps.py").write_text(body)
    return build_fab_from_disk(app)


class _Counted:
    """Flower's own install_from_fab, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args: object) -> Path:
        self.calls += 1
        return flwr.cli.install.install_from_fab(*args)


@pytest.fixture
def flwr_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "flwr-home"
    monkeypatch.setenv("FLWR_HOME", str(home))
    return home


def test_flowers_install_code_is_the_one_pinned() -> None:
    """Fails when Flower's install_from_fab, validate_and_install or get_project_dir change: redo the pin."""
    assert installed_fab.source_refusal() is None


def test_a_fab_is_unpacked_once_then_its_verified_folder_is_returned(tmp_path: Path, flwr_home: Path) -> None:
    fab = _fab(tmp_path, "x = 1\n")
    flower = _Counted()
    install = install_once(flower)
    first = install(fab, None, True)
    assert flower.calls == 1
    assert first.is_relative_to(flwr_home) and (first / "tinyapp" / "apps.py").read_text() == "x = 1\n"
    assert (first / MARKER).is_file()
    for _ in range(3):
        assert install(fab, skip_prompt=True) == first
    assert flower.calls == 1  # Flower's unpacking ran for the first message only


def test_another_fab_or_a_foreign_marker_goes_through_flower(tmp_path: Path, flwr_home: Path) -> None:
    flower = _Counted()
    install = install_once(flower)
    first = install(_fab(tmp_path, "x = 1\n"), None, True)
    second = install(_fab(tmp_path, "x = 2\n"), None, True)
    assert flower.calls == 2 and second != first
    assert (second / "tinyapp" / "apps.py").read_text() == "x = 2\n"
    (first / MARKER).write_text("0" * 64)  # a folder not verified against this FAB
    assert install(_fab(tmp_path, "x = 1\n"), None, True) == first
    assert flower.calls == 3
    assert install(_fab(tmp_path, "x = 1\n"), None, True) == first
    assert flower.calls == 3  # verified again by Flower, then remembered


def test_anything_but_a_ClientApps_call_is_flowers(tmp_path: Path, flwr_home: Path) -> None:
    """A FAB file, another install folder or a prompt: Flower's function, and no marker written."""
    fab = _fab(tmp_path, "x = 1\n")
    flower = _Counted()
    install = install_once(flower)
    elsewhere = install(fab, tmp_path / "elsewhere", True)
    assert flower.calls == 1 and not (elsewhere / MARKER).exists()
    path = tmp_path / "tiny.fab"
    path.write_bytes(fab)
    with pytest.raises(Exception):  # noqa: B017 - Flower checks a FAB file's name against its contents
        install(path, None, True)
    assert flower.calls == 2


def test_an_unreadable_fab_is_left_to_flower() -> None:
    flower_saw = []

    def flower(*args: object) -> Path:
        flower_saw.append(args)
        raise ValueError("not a FAB")

    with pytest.raises(ValueError, match="not a FAB"):
        install_once(flower)(b"not a zip", None, True)
    assert len(flower_saw) == 1


def test_a_changed_flower_keeps_its_own_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pinned source that differs: one line naming it, and the runtime's install_from_fab untouched."""
    key = ("flwr.cli.install", "validate_and_install")
    monkeypatch.setitem(installed_fab.PINNED_SOURCES, key, "0" * 64)
    before = run_clientapp.install_from_fab
    refused = installed_fab.install(run_clientapp)
    assert refused is not None and "validate_and_install differs from flwr 1.41.0's" in refused
    assert run_clientapp.install_from_fab is before
