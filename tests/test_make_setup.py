"""The set-up command on a machine without the room for a new virtual environment.

A fresh `.venv` takes about 7 GB. On a full disk pip used to fail half-way through torch with an
OSError deep in site-packages; `make` now says so in one line before it creates anything.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_new_venv_refused_in_one_line_when_the_disk_is_short(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    done = subprocess.run(
        ["make", "-s", f"VENV={venv}", "VENV_MIN_GB=1000000", f"{venv}/.fedtransfer-installed"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    first = done.stderr.splitlines()[0]
    assert f"a new {venv} needs about 1000000 GB of disk" in first
    assert "free some space" in first
    assert "Traceback" not in done.stderr
    assert not venv.exists()
