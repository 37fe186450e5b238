"""Another local account on a site's machine cannot take the site's tasks (issue 24, item 1).

Tried as the issue tried it: as `nobody`, POST /v1/runtime/acquire-task to the SuperNode's
loopback Runtime API. Against a SuperNode as Flower 1.41 runs it by default (subprocess
isolation) that answers 200, and the task token in the answer would let a forged reply through;
against a site `fedtransfer deploy site` started it is refused, and the secret is unreadable.
"""

from __future__ import annotations

import http.client
import os
import pwd
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from fedtransfer.deploy.credentials import init_deployment
from fedtransfer.deploy.launch import LOOPBACK
from fedtransfer.deploy.superexec import SECRET_NAME
from fedtransfer.deploy.superexec_zygote import OFF_ENV, ZYGOTE_NAME
from fedtransfer.server.launch.launcher import BIN_DIR, flower_env, stop_process_group
from flwr.proto.runtime_pb2 import AcquireTaskRequest

from tests.deploy_harness import free_ports

REPO = Path(__file__).resolve().parent.parent
ZYGOTE = ZYGOTE_NAME.decode()
_PORT_LINE = re.compile(rf"its Runtime API on {re.escape(LOOPBACK)}:(\d+)")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="acting as another local user needs root to switch to it"),
]


def _as_nobody(action: Callable[[], str]) -> str:
    """What `action` returns when run by the account `nobody`, in a forked child."""
    nobody = pwd.getpwnam("nobody")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody for good, act, report, never return into pytest
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            result = action()
        except BaseException as err:
            result = f"error {type(err).__name__}"
        os.write(write, result.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        result = answer.read()
    os.waitpid(pid, 0)
    return result


def _acquire_task(port: int) -> Callable[[], str]:
    def action() -> str:
        conn = http.client.HTTPConnection(LOOPBACK, port, timeout=10)
        body = AcquireTaskRequest(supported_task_types=["clientapp"]).SerializeToString()
        conn.request("POST", "/v1/runtime/acquire-task", body, {"content-type": "application/protobuf"})
        return str(conn.getresponse().status)

    return action


def _read(path: Path) -> Callable[[], str]:
    return lambda: f"read {len(path.read_bytes())} bytes"


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited with code {proc.returncode}"
        try:
            http.client.HTTPConnection(LOOPBACK, port, timeout=1).connect()
            return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"nothing listens on {LOOPBACK}:{port}")


def test_flowers_default_supernode_hands_its_task_to_any_local_user(tmp_path: Path) -> None:
    """The attack, as a reference: the request below is one a Runtime API without authentication answers."""
    port, dead_superlink = free_ports(2)
    argv = [str(BIN_DIR / "flower-supernode"), "--insecure", "--superlink", f"{LOOPBACK}:{dead_superlink}"]
    proc = subprocess.Popen(
        [*argv, "--host", LOOPBACK, "--port", str(port)],
        env=flower_env(tmp_path / "flwr-home"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_listening(port, proc)
        assert _as_nobody(_acquire_task(port)) == "200"
    finally:
        stop_process_group(proc, grace_s=5.0)


@pytest.mark.parametrize("zygote", ["on", "--no-zygote", f"{OFF_ENV}=1"])
def test_a_site_started_with_deploy_site_refuses_another_local_user(tmp_path: Path, zygote: str) -> None:
    creds = init_deployment(tmp_path / "creds", ["alpha"], [])
    (tmp_path / "data.npz").write_bytes(b"")
    site = tmp_path / "site.yaml"
    site.write_text(
        yaml.safe_dump({"name": "alpha", "data_source": "npz", "data_path": "data.npz", "state_dir": "state"})
    )
    (dead_superlink,) = free_ports(1)
    argv = [sys.executable, "-m", "fedtransfer.cli", "deploy", "site", "--config", str(site), "--no-worker"]
    argv += ["--no-zygote"] if zygote == "--no-zygote" else []
    env = dict(os.environ) | {"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env |= {OFF_ENV: "1"} if zygote == f"{OFF_ENV}=1" else {}
    proc = subprocess.Popen(
        [*argv, "--credentials", str(creds.root), "--superlink", f"{LOOPBACK}:{dead_superlink}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        port = next((int(m.group(1)) for line in proc.stdout if (m := _PORT_LINE.search(line))), None)
        assert port is not None, f"deploy site ended with code {proc.wait()}"
        _wait_listening(port, proc)
        secret = tmp_path / "state" / SECRET_NAME
        assert secret.stat().st_size == 32 and secret.stat().st_mode & 0o077 == 0
        refused = _as_nobody(_acquire_task(port))
        assert refused == "401", refused  # Flower: RUNTIME_AUTHENTICATION_FAILED
        assert _as_nobody(_read(secret)) == "error PermissionError"
        session = _session(proc.pid)
        superexecs = [p for p in session if "flower-superexec" in " ".join(p.cmdline()) and p.name() != ZYGOTE]
        assert len(superexecs) == 1 and str(secret) in superexecs[0].cmdline()  # the one that may take tasks
        zygotes = [p for p in session if p.name() == ZYGOTE]  # forked from it before it read the secret
        assert [z.ppid() for z in zygotes] == ([superexecs[0].pid] if zygote == "on" else [])
    finally:
        stop_process_group(proc, grace_s=10.0)
        assert proc.stdout is not None
        proc.stdout.close()
    assert not (tmp_path / "state" / SECRET_NAME).exists()  # a stopped site leaves no secret behind


def _session(leader: int) -> list:
    import psutil

    return [psutil.Process(leader), *psutil.Process(leader).children(recursive=True)]
