"""`fedtransfer simulate`: run a config on Flower's Simulation Engine, the same way `flwr run .` does.

We start a private simulation-mode SuperLink on free loopback ports with its own
FLWR_HOME inside the run folder, submit this app through `fedtransfer.server.launch.launcher` and stop
the SuperLink afterwards, so nothing lingers and two simulations never collide.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tomli_w
from fedtransfer.common.config.run import RunConfig
from fedtransfer.server.federation.console import recorded_warnings
from fedtransfer.server.launch.cluster import check_cluster
from fedtransfer.server.launch.launcher import (
    LaunchError,
    RunFailed,
    flower_bin,
    flower_env,
    stop_process_group,
    submit_run,
)
from fedtransfer.server.launch.preflight import check_run


class SimulationError(LaunchError):
    """The simulation could not start or did not complete; the message says why."""


# Ray's switch for "this machine only": with it off, Ray takes 127.0.0.1 as the node address and its
# GCS server, raylet, runtime-env agent and every worker (each ClientApp actor) listen on loopback only.
# Left on (Ray's default on Linux), they listen on every interface, and whoever reaches an open GCS
# can join as a driver and run code (the exposure behind CVE-2023-48022).
RAY_LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def simulation_env(flwr_home: Path, ray_address: str | None) -> dict[str, str]:
    """The environment of the simulation's SuperLink, and so of the Ray it starts.

    Without `ray_address` the Ray started for this run opens nothing beyond loopback. With it, Ray
    joins the operator's cluster, whose nodes bind where the operator's `ray start` said; the
    loopback switch would make this driver unreachable from the other nodes, so it is not set.
    """
    env = flower_env(flwr_home)
    env.pop("RAY_ADDRESS", None)  # only --ray-address joins a cluster: never one a shell happened to export
    if ray_address:
        env["RAY_ADDRESS"] = ray_address  # Flower's RayBackend calls ray.init() without an address: Ray reads it
    else:
        env |= RAY_LOOPBACK_ONLY
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def simulation_superlink(flwr_home: Path, log_path: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """A simulation-mode SuperLink on loopback; yields the connection name for `flwr run`.

    `env` (default: `simulation_env(flwr_home, None)`, everything on loopback) is what the SuperLink,
    and so the simulation and the Ray it starts, runs in.
    """
    port, control = _free_port(), _free_port()
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        tomli_w.dumps({"superlink": {"default": "sim", "sim": {"address": f"127.0.0.1:{port}", "insecure": True}}})
    )
    argv = [
        flower_bin("flower-superlink"),
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--control-api-address",
        f"127.0.0.1:{control}",
        "--disable-runtime-dependency-installation",
    ]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            argv,
            env=env or simulation_env(flwr_home, None),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_listening(port, proc, log_path)
        yield "sim"
    finally:
        stop_process_group(proc, grace_s=10.0)  # the SuperLink and all it spawned (SuperExec, Ray)


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


def simulate(
    cfg: RunConfig,
    num_sites: int | None = None,
    stream: bool = True,
    app_dir: Path | None = None,
    verbose: bool = False,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Run `cfg` with one simulated SuperNode per site; returns the run's status.json.

    Folders, data and backbone are checked first (`fedtransfer.server.launch.preflight`), before any Flower process.
    `ray_address` (host:port of a Ray head) runs the sites on that existing Ray cluster instead of
    a Ray started for this run: `server.launch.cluster` first proves every node sees output_dir and cache_dir.
    `stream` shows one line per round plus warnings (`verbose`: every log line); the whole log is
    in `output_dir/run.log` either way. `app_dir` is the Flower app to submit (tests submit a copy
    with an instrumented ServerApp).
    """
    sites = num_sites or cfg.data.num_sites
    with recorded_warnings() as said:  # printed here once; the ServerApp's copies are left out below
        check_run(cfg, sites)
    run_dir = cfg.output_path
    env = simulation_env(run_dir / ".flwr", ray_address)
    if ray_address:
        check_cluster(ray_address, {"output_dir": run_dir, "cache_dir": cfg.cache_path})
    with simulation_superlink(run_dir / ".flwr", run_dir / "superlink.log", env) as connection:
        try:
            outcome = submit_run(
                cfg,
                connection,
                env=env,
                app_dir=app_dir,
                stream=stream,
                verbose=verbose,
                shown=said,
                federation_config=f"num-supernodes={sites} client-resources-num-cpus=1",
                resume_with="the same fedtransfer simulate command with --resume",
            )
        except RunFailed:
            raise
        except LaunchError as err:
            raise SimulationError(str(err)) from None
    return outcome.status
