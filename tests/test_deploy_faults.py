"""Faults of a deployment (issue 24, items 5 and 7): sites started together, a crashed coordinator."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from fedtransfer.cli import deploy as deploy_cli
from fedtransfer.cli.main import main
from fedtransfer.deploy.credentials import init_deployment
from fedtransfer.deploy.launch import LOOPBACK
from fedtransfer.server.launch import launcher
from fedtransfer.server.launch.launcher import stop_process_group

from tests.deploy_harness import free_ports

REPO = Path(__file__).resolve().parent.parent
SITES = ("alpha", "beta", "gamma")
_PORT_LINE = re.compile(rf"its Runtime API on {re.escape(LOOPBACK)}:(\d+)")


def _site_yaml(root: Path, name: str) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "data.npz").write_bytes(b"")
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump({"name": name, "data_source": "npz", "data_path": "data.npz", "state_dir": "state"}))
    return path


def _listening_ports(leader: int) -> set[int]:
    """Loopback ports a process of the session `leader` heads listens on (its SuperNode's Runtime API)."""
    ports = set()
    for proc in [psutil.Process(leader), *psutil.Process(leader).children(recursive=True)]:
        try:
            ports |= {c.laddr.port for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            continue
    return ports


def _announced_port(proc: subprocess.Popen[str]) -> int:
    """The port `deploy site` says its SuperNode's Runtime API is on (its first lines may be warnings)."""
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        if found := _PORT_LINE.search(line):
            return int(found.group(1))
        seen.append(line)
    pytest.fail(f"deploy site ended (exit code {proc.wait()}) without naming its port: {''.join(seen)[-2000:]}")


@pytest.mark.slow
def test_three_sites_started_at_once_each_get_their_own_port(tmp_path: Path) -> None:
    """Three real SuperNodes started together each listen on a port of their own and keep running."""
    creds = init_deployment(tmp_path / "creds", list(SITES), [])
    (dead_superlink,) = free_ports(1)  # nothing answers: each SuperNode keeps retrying, its port held
    env = dict(os.environ) | {"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    common = ["--credentials", str(creds.root), "--superlink", f"{LOOPBACK}:{dead_superlink}", "--no-worker"]
    procs = {
        name: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedtransfer.cli",
                "deploy",
                "site",
                "--config",
                str(_site_yaml(tmp_path, name)),
                *common,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for name in SITES
    }
    try:
        ports = {}
        for name, proc in procs.items():
            ports[name] = _announced_port(proc)
        assert len(set(ports.values())) == len(SITES), ports
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs.values()), {n: p.poll() for n, p in procs.items()}
            if all(ports[name] in _listening_ports(proc.pid) for name, proc in procs.items()):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"not every SuperNode listens on its port: {ports}")
        time.sleep(3.0)  # a SuperNode that lost a race for its port dies right after binding
        assert all(p.poll() is None for p in procs.values()), {n: p.poll() for n, p in procs.items()}
    finally:
        for proc in procs.values():
            stop_process_group(proc, grace_s=5.0)
            assert proc.stdout is not None
            proc.stdout.close()


def test_a_second_site_skips_a_port_claimed_before_its_supernode_listens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The race of item 5 without its timing: the first site holds its port and nothing listens there yet."""
    creds = init_deployment(tmp_path / "creds", ["alpha", "beta"], [])
    first = tmp_path / "first-claimed"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom fedtransfer.deploy.ports import claimed_supernode_port\n"
            "with claimed_supernode_port(None) as port:\n"
            "    open(sys.argv[1], 'w').write(str(port)); time.sleep(60)",
            str(first),
        ],
        env=dict(os.environ) | {"PYTHONPATH": str(REPO)},
    )
    try:
        deadline = time.monotonic() + 30
        while not (first.exists() and first.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        claimed = int(first.read_text())
        site = ["deploy", "site", "--config", str(_site_yaml(tmp_path, "beta")), "--credentials", str(creds.root)]
        assert main([*site, "--superlink", "h:1", "--dry-run"]) == 0
        argv = capsys.readouterr().out.split()
        assert int(argv[argv.index("--port") + 1]) != claimed
        assert main([*site, "--superlink", "h:1", "--port", str(claimed), "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--port {claimed}: {LOOPBACK}:{claimed} is in use" in err, err
    finally:
        holder.kill()
        holder.wait()


def test_a_crashed_coordinator_says_how_to_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`flwr run` ends with code 1 when the SuperLink dies mid-run: the one line names `--resume` and the folder."""
    crashed = tmp_path / "flwr"
    crashed.write_text("#!/bin/sh\necho 'Successfully started run 7'\nexit 1\n")
    crashed.chmod(0o755)
    monkeypatch.setattr(launcher, "flower_bin", lambda _name: str(crashed))
    monkeypatch.setattr(deploy_cli, "check_run", lambda _cfg: None)  # data and backbone: not this test's subject
    run_dir = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(run_dir), "cache_dir": str(tmp_path / "cache")}))
    assert main(["deploy", "run", "--config", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "flwr run exited with code 1" in err and f"see {run_dir / 'run.log'}" in err
    assert f"continue it with `fedtransfer deploy run --resume {run_dir} --connection fedtransfer`" in err
