"""Only a site's own processes may take its tasks from its SuperNode (issue 24, item 1).

A SuperNode serves its Runtime API on a loopback port (plain HTTP) to the SuperExec that starts
ClientApps. In Flower 1.41's default `--isolation subprocess` that API asks for no credentials:
`flwr/supernode/start_client_internal.py` sets `superexec_auth_secret = None` in that mode and
warns that a given secret is ignored. Any local account could POST /v1/runtime/acquire-task,
take the site's message (the global model, the site's run config) and push a forged reply with
the task token it got.

`deploy site` therefore runs the SuperNode with `--isolation process` and starts the SuperExec
itself, both given one shared secret: the SuperExec signs every AcquireTask with it (HMAC over
the body, a timestamp and a nonce; `flwr/supercore/dependencies/superexec.py`), and every later
call of a task needs that task's token, which only AcquireTask hands out. The secret is fresh at
each start, in the site's owner-only state folder, and removed when the site stops.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from fedtransfer.deploy.launch import LOOPBACK

SECRET_NAME = "superexec.secret"
SECRET_BYTES = 32


@contextmanager
def superexec_secret(state_dir: Path) -> Iterator[Path]:
    """A fresh secret readable by this account only, for the block; then it is gone."""
    path = state_dir / SECRET_NAME
    path.unlink(missing_ok=True)  # a crashed start's secret: never reused
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(SECRET_BYTES))
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def superexec_argv(*, port: int, secret: Path, parent_pid: int, executable: str = "flower-superexec") -> list[str]:
    """The SuperExec Flower starts itself in subprocess isolation, plus the secret that mode drops.

    Plain HTTP, as Flower's own: the Runtime API is on loopback, and the secret authenticates.
    `--parent-pid` ends it with the `deploy site` process that started it.
    """
    return [
        executable,
        "--insecure",
        "--runtime-api-address",
        f"{LOOPBACK}:{port}",
        "--superexec-auth-secret-file",
        str(secret),
        "--parent-pid",
        str(parent_pid),
    ]


def start_superexec(argv: list[str], env: Mapping[str, str]) -> subprocess.Popen:
    """The SuperExec, in this process's group (a signal to the group stops it with the SuperNode)."""
    return subprocess.Popen(argv, env=dict(env))


def stop_superexec(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
