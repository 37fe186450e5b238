"""`fedtransfer simulate`: run a config on Flower's Simulation Engine, the same way `flwr run .` does.

We start a private simulation-mode SuperLink on free loopback ports with its own
FLWR_HOME inside the run folder, submit this app with `flwr run`, stream its logs and
stop the SuperLink afterwards, so nothing lingers and two simulations never collide.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import tomli_w

from common.config import RunConfig, to_nested

APP_DIR = Path(__file__).resolve().parent.parent  # the repository root: pyproject.toml lives here
QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1"}


class SimulationError(RuntimeError):
    """The simulation could not start or did not complete; the message says why."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    """Flower's executables from the same environment as this interpreter."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def _env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ) | QUIET | {"FLWR_HOME": str(flwr_home)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # superexec by name
    return env


@contextmanager
def simulation_superlink(flwr_home: Path, log_path: Path) -> Iterator[str]:
    """A simulation-mode SuperLink on loopback; yields the connection name for `flwr run`."""
    port, control = _free_port(), _free_port()
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        tomli_w.dumps({"superlink": {"default": "sim", "sim": {"address": f"127.0.0.1:{port}", "insecure": True}}})
    )
    argv = [_bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
            "--host", "127.0.0.1", "--port", str(port), "--control-api-address", f"127.0.0.1:{control}",
            "--disable-runtime-dependency-installation"]  # fmt: skip
    with log_path.open("ab") as log:
        proc = subprocess.Popen(argv, env=_env(flwr_home), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        _wait_listening(port, proc, log_path)
        yield "sim"
    finally:
        _stop_group(proc)


def _wait_listening(port: int, proc: subprocess.Popen, log_path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SimulationError(f"flower-superlink exited with code {proc.returncode}; see {log_path}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise SimulationError(f"flower-superlink did not listen on 127.0.0.1:{port} within {timeout:.0f}s; see {log_path}")


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop the SuperLink and everything it spawned (SuperExec, simulation, Ray)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def simulate(cfg: RunConfig, num_sites: int | None = None, stream: bool = True, app_dir: Path = APP_DIR) -> dict:
    """Run `cfg` with one simulated SuperNode per site; returns the run's status.json.

    `stream` shows the run's log live; otherwise it goes to `output_dir/run.log`.
    `app_dir` is the Flower app to submit (tests submit a copy with an instrumented ServerApp).
    """
    cfg = replace(cfg, output_dir=str(cfg.output_path), cache_dir=str(cfg.cache_path))  # the app runs elsewhere
    sites = num_sites or cfg.data.num_sites
    run_dir = cfg.output_path
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = run_dir / "run-config.toml"
    overrides.write_text(tomli_w.dumps(to_nested(cfg)))
    status_path = run_dir / "status.json"
    if not cfg.resume:
        status_path.unlink(missing_ok=True)
    flwr_home = run_dir / ".flwr"
    with simulation_superlink(flwr_home, run_dir / "superlink.log") as connection:
        argv = [_bin("flwr"), "run", str(app_dir), connection, "--run-config", str(overrides), "--stream",
                "--federation-config", f"num-supernodes={sites} client-resources-num-cpus=1"]  # fmt: skip
        # --stream also makes `flwr run` wait for the run to end; quiet runs keep the log in a file
        with (run_dir / "run.log").open("wb") as log:
            sink = None if stream else log
            done = subprocess.run(argv, env=_env(flwr_home), cwd=app_dir, stdout=sink, stderr=sink, check=False)
    if done.returncode != 0:
        raise SimulationError(f"flwr run exited with code {done.returncode}")
    if not status_path.exists():
        raise SimulationError(f"the run ended without writing {status_path}; see the log (run.log when quiet)")
    status = json.loads(status_path.read_text())
    if status.get("status") != "completed":
        raise SimulationError(status.get("error", "the run failed; see the log above"))
    return status
