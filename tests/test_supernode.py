"""`deploy/supernode.py`: the SuperNode wrapper returns when the SuperNode exits, even while a child it started
(Flower's `flower-superexec`) still holds its output pipe, and it retries or explains a refused activation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fedtransfer.deploy.supernode import ACTIVATION_REFUSED

ROOT = Path(__file__).resolve().parents[1]


def _wrapped(said: str, code: int, retry_for: float) -> subprocess.CompletedProcess[str]:
    """`run_supernode` around a stand-in SuperNode that starts a child inheriting its stdout (outliving it by a
    minute), says `said` and exits with `code`; the wrapper runs as its own process (it installs signal handlers),
    and a wrapper that waited for the orphan's end of file would run into the timeout."""
    node = (
        "import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"print({said!r}, flush=True); sys.exit({code})"
    )
    wrapper = (
        "import os, sys; from fedtransfer.deploy.supernode import ActivationError, run_supernode\n"
        "try:\n"
        f"    sys.exit(run_supernode([sys.executable, '-c', {node!r}], os.environ, 'hospital-a', {retry_for},"
        " pause=0.2))\n"
        "except ActivationError as error:\n"
        "    print(f'ActivationError: {error}', file=sys.stderr); sys.exit(99)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", wrapper],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=40,
        start_new_session=True,
        check=False,
    )


def test_an_exit_with_a_child_still_holding_the_pipe_returns_its_code() -> None:
    done = _wrapped("node stopped", 7, 0.0)
    assert done.returncode == 7, done.stderr
    assert "node stopped" in done.stdout  # its output passes through


def test_a_refused_activation_is_retried_then_explained() -> None:
    done = _wrapped(f"{ACTIVATION_REFUSED}: key unknown", 5, 4.0)
    assert done.returncode == 99, done.stderr
    assert "retrying" in done.stderr
    assert "ActivationError: the SuperLink refused to activate site hospital-a" in done.stderr
