"""A single-machine `fedtransfer simulate` opens nothing beyond loopback (issue 24, item 2),
and what it writes is its user's alone (item 4).

An open Ray GCS lets anyone who reaches the machine join as a driver and run code, so every
listener of the run (Flower's SuperLink and SuperExec, Ray's GCS server, raylet, runtime-env
agent and each ClientApp actor) must be on 127.0.0.1 or ::1. The test lists the LISTEN
sockets of every process of a real run while it trains, started from a shell whose umask is 022,
then the modes of every file the run and its sites wrote.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from fedtransfer.server.launch.launcher import stop_process_group
from fedtransfer.server.launch.simulation import simulation_env

RUN = {
    "run_name": "loopback",
    "backbone": {"image_size": 32},
    "data": {"num_sites": 2, "max_samples": 600, "split": "iid"},
    "train": {"rounds": 3, "local_epochs": 2, "protocol": "fedavg"},
    "privacy": {"target_epsilon": 3.0, "target_delta": 1.0e-4, "feature_stats": False, "accountant": "rdp"},
}


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1, an IPv6 socket bound to IPv4 loopback
    return address.is_loopback


def _run_processes(leader: int) -> list[psutil.Process]:
    """The leader, its descendants and whatever else runs in its session (a daemon Ray reparented)."""
    procs = {leader: psutil.Process(leader)}
    procs |= {p.pid: p for p in procs[leader].children(recursive=True)}
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == leader:
                procs[p.pid] = p
        except (ProcessLookupError, PermissionError):
            continue
    return list(procs.values())


def _listeners(leader: int) -> set[tuple[str, str, int]]:
    seen = set()
    for proc in _run_processes(leader):
        try:
            name = proc.name()
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    seen.add((name, conn.laddr.ip, conn.laddr.port))
        except psutil.Error:
            continue  # a process that ended between listing and reading
    return seen


@pytest.mark.slow
def test_a_simulation_listens_on_loopback_only_and_writes_owner_only_files(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(RUN | {"output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache")}))
    env = dict(os.environ) | {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedtransfer.cli", "simulate", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        umask=0o022,
    )
    seen: set[tuple[str, str, int]] = set()
    try:
        deadline = time.monotonic() + 480
        while proc.poll() is None and time.monotonic() < deadline:
            seen |= _listeners(proc.pid)
            time.sleep(0.5)
    finally:
        stop_process_group(proc, grace_s=5.0)
    assert proc.returncode == 0, (tmp_path / "run" / "run.log").read_text()[-3000:]
    names = {name for name, _, _ in seen}
    # the sampling saw the run while Ray and the sites were up, so the assertion below covers them
    assert {"gcs_server", "raylet"} <= names, sorted(seen)
    assert any(name.startswith("flower-superlin") for name in names), sorted(seen)
    open_to_network = sorted(s for s in seen if not _is_loopback(s[1]))
    assert open_to_network == [], open_to_network
    # the sites' ledgers, audit logs and seeds, the server's audit log, Flower's state, the features
    written = [p for root in (tmp_path / "run", tmp_path / "cache") for p in (root, *root.rglob("*"))]
    assert any(p.name == "audit.jsonl" and p.parent.parent.name == "sites" for p in written)
    readable = sorted(f"{p} {oct(p.lstat().st_mode)}" for p in written if p.lstat().st_mode & 0o077)
    assert readable == [], readable


def test_only_a_single_machine_simulation_is_kept_on_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cluster run joins the operator's Ray (nodes bind where its `ray start` says); a shell's RAY_ADDRESS
    or loopback switch never decides which Ray a simulation uses."""
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")
    local = simulation_env(tmp_path, None)
    assert "RAY_ADDRESS" not in local and local["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    cluster = simulation_env(tmp_path, "10.0.0.1:6379")
    assert cluster["RAY_ADDRESS"] == "10.0.0.1:6379" and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in cluster
