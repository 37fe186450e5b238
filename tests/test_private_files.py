"""A site's and a coordinator's state is owner-only however they are started (issue 24, item 4).

Run by hand from a shell whose umask is 022 (not under the systemd units' UMask=0077), the
SuperLink's database and a site's state folder were world-readable. Each test starts the
command from such a shell and reads the modes of what it and its children wrote.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from fedtransfer.cli import deploy as deploy_cli
from fedtransfer.cli.main import main
from fedtransfer.deploy.credentials import init_deployment
from fedtransfer.server.launch.launcher import stop_process_group

from tests.deploy_harness import free_ports

REPO = Path(__file__).resolve().parent.parent

# what Flower's ClientApp does in a site's state folder, as a child of `deploy site`
_FAKE_SUPERNODE = """\
import sys
from pathlib import Path

state = Path(sys.argv[1])
(state / "privacy-ledger.json").write_text("{}")
(state / "replies").mkdir()
(state / "replies" / "round-1.bin").write_bytes(b"reply")
"""


@contextmanager
def _shell_umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def _open_to_others(root: Path) -> list[str]:
    """Every path under `root` (itself included) that the group or others may read, write or enter."""
    paths = [root, *root.rglob("*")]
    return sorted(f"{p} {stat.filemode(p.lstat().st_mode)}" for p in paths if p.lstat().st_mode & 0o077)


def test_a_site_started_by_hand_keeps_its_state_folder_to_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = init_deployment(tmp_path / "creds", ["alpha"], [])
    state = tmp_path / "state"
    state.mkdir(mode=0o755)  # left open by an earlier version
    state.chmod(0o755)
    (tmp_path / "data.npz").write_bytes(b"")
    site = tmp_path / "site.yaml"
    site.write_text(
        yaml.safe_dump({"name": "alpha", "data_source": "npz", "data_path": "data.npz", "state_dir": "state"})
    )
    fake = tmp_path / "fake_supernode.py"
    fake.write_text(_FAKE_SUPERNODE)
    monkeypatch.setattr(deploy_cli, "supernode_argv", lambda *_a, **_k: [sys.executable, str(fake), str(state)])
    argv = ["deploy", "site", "--config", str(site), "--credentials", str(creds.root), "--superlink", "h:1"]
    with _shell_umask(0o022):
        assert main([*argv, "--no-worker"]) == 0
        assert os.umask(0o022) == 0o022  # the caller's umask is its own again
    assert (state / "replies" / "round-1.bin").read_bytes() == b"reply"
    assert _open_to_others(state) == []


def test_a_superlink_started_by_hand_keeps_its_database_to_itself(tmp_path: Path) -> None:
    creds = init_deployment(tmp_path / "creds", ["alpha"], ["127.0.0.1"])
    folder = tmp_path / "link"
    folder.mkdir()
    database = folder / "superlink.db"
    (port,) = free_ports(1)
    argv = [sys.executable, "-m", "fedtransfer.cli", "deploy", "superlink", "--credentials", str(creds.root)]
    env = dict(os.environ) | {"PYTHONPATH": str(REPO)}
    with _shell_umask(0o022):
        proc = subprocess.Popen(
            [*argv, "--database", str(database), "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        while not database.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # its journal files, if any, beside it
        assert database.is_file(), f"no database (exit code {proc.poll()})"
        assert _open_to_others(folder) == [str(folder) + " drwxr-xr-x"]  # only the folder the test made
    finally:
        stop_process_group(proc, grace_s=5.0)
