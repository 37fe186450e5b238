"""A two-node Ray cluster on loopback for tests and the cluster benchmark, always stopped afterwards.

The head offers no CPU, so no site can run there: every ClientApp actor of a simulation
runs on the worker node, and a run that completes proves that the sites ran on a second
node of an existing cluster. Each node has its own temp folder and ports; both run
`ray start --block` in a process group of their own, which is what is killed at the end
(never `ray stop`, which would stop every Ray on the machine). Ray replaces a node address
of 127.0.0.1 by the machine's outward one (and RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which
would keep it, refuses a second node), so the head is 127.0.0.2 and the worker 127.0.0.3:
Linux routes all of 127.0.0.0/8 over loopback, and Ray takes those addresses as given.

`hide` starts the worker in a mount namespace of its own with an empty tmpfs over that
folder: a node that does not share the run's storage, on one machine.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedtransfer.server.launch.launcher import stop_process_group

RAY = str(Path(sys.executable).parent / "ray")
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}  # no usage report is attempted
START_TIMEOUT_S = 90.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def can_hide_folders() -> bool:
    """Whether this machine lets us start a process in a mount namespace of its own (root, unshare)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    return probe.returncode == 0


def _node_argv(temp_dir: Path, cpus: int, ip: str) -> list[str]:
    return [
        RAY,
        "start",
        "--block",
        "--node-ip-address",
        ip,
        "--num-cpus",
        str(cpus),
        "--object-store-memory",
        str(100 * 2**20),
        "--temp-dir",
        str(temp_dir),
        "--disable-usage-stats",
        "--dashboard-agent-listen-port",
        str(_free_port()),
        "--dashboard-agent-grpc-port",
        str(_free_port()),
        "--metrics-export-port",
        str(_free_port()),
        "--runtime-env-agent-port",
        str(_free_port()),
    ]


@contextmanager
def two_node_cluster(root: Path, worker_cpus: int = 2, hide: Path | None = None) -> Iterator[str]:
    """Start a head (0 CPUs) and a worker (`worker_cpus`); yields the head's address "127.0.0.1:PORT"."""
    env = dict(os.environ) | RAY_ENV
    env.pop("RAY_ADDRESS", None)
    port = _free_port()
    head = [
        *_node_argv(root / "head", 0, HEAD_IP),
        "--head",
        "--port",
        str(port),
        "--include-dashboard",
        "false",
        "--ray-client-server-port",
        str(_free_port()),
    ]
    worker = [*_node_argv(root / "worker", worker_cpus, WORKER_IP), "--address", f"{HEAD_IP}:{port}"]
    if hide is not None:
        worker = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            'mount -t tmpfs tmpfs "$0" && exec "$@"',
            str(hide),
            *worker,
        ]
    procs: list[subprocess.Popen] = []
    try:
        for argv, name in ((head, "head"), (worker, "worker")):
            (root / name).mkdir(parents=True, exist_ok=True)
            with (root / f"{name}.log").open("wb") as log:
                procs.append(
                    subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                )
            _wait_nodes(port, len(procs), procs, root, env)
        yield f"{HEAD_IP}:{port}"
    finally:
        for proc in reversed(procs):
            stop_process_group(proc, grace_s=15.0)  # ray start --block stops its node on SIGTERM


def _wait_nodes(port: int, count: int, procs: list[subprocess.Popen], root: Path, env: dict[str, str]) -> None:
    """Until `ray status` at the head lists `count` active nodes (bounded)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"a Ray node exited with {proc.returncode}; see {root}/*.log")
        status = subprocess.run(
            [RAY, "status", "--address", f"{HEAD_IP}:{port}"], env=env, capture_output=True, text=True, timeout=30
        )
        if status.returncode == 0 and status.stdout.split("Pending:")[0].count(" node_") >= count:
            return
        time.sleep(1.0)
    raise RuntimeError(f"the Ray cluster did not reach {count} node(s) within {START_TIMEOUT_S:.0f}s; see {root}")
