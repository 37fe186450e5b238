"""Submit this app to a SuperLink with `flwr run`, follow it and read its verdict from status.json.

The one launcher behind `fedtransfer simulate` (a private simulation SuperLink) and
`fedtransfer deploy run` (the deployment's SuperLink), and the one place that knows how
Flower's own executables are found and what environment they run in.

`flwr run --stream` exits 0 even when the ServerApp failed, so the verdict is the
`status.json` the ServerApp writes into `output_dir`. Everything the run streams goes to
`output_dir/run.log`; the console gets what `fedtransfer.server.federation.console.ConsoleFilter` lets through.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import tomli_w
from fedtransfer.common.config.run import RunConfig, to_nested
from fedtransfer.common.storage import atomic, locking
from fedtransfer.server.federation import run_folder
from fedtransfer.server.federation.console import ANSI, ConsoleFilter
from fedtransfer.server.launch.app_folder import app_folder

BIN_DIR = Path(sys.executable).parent  # flwr, flower-superlink and flower-supernode of this environment
# no update checks or telemetry calls to the internet; logs as they happen
QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1"}
# A SuperExec (each site's, the SuperLink's for the ServerApp) asks for a new task every 1 s by default
# (flwr/supercore/superexec/run_superexec.py:48-51): each message waited 0.5 s on average for its process.
# 0.1 s polls its own host's loopback API only; an operator's own value in the environment wins.
PACING_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}
_FLOWER_RUN_ID = re.compile(r"Successfully started run (\d+)")


class LaunchError(RuntimeError):
    """A run could not be submitted or did not complete; the message says why and where to look."""


class RunFailed(LaunchError):
    """The run ran and ended FAILED (status.json says so and why): no model was exported."""


@dataclass(frozen=True)
class RunOutcome:
    """What a completed run left: its status.json, and the id Flower gave it (`flwr log`/`flwr ls` take it)."""

    status: dict[str, Any]
    flower_run_id: int | None


def flower_bin(name: str) -> str:
    """A Flower executable of the environment running this interpreter (a venv need not be on PATH)."""
    here = BIN_DIR / name
    return str(here) if here.exists() else name


def flower_env(flwr_home: Path | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: quiet, this environment's bin first (Flower starts
    flower-superexec by name), and optionally an own FLWR_HOME."""
    env = PACING_ENV | dict(os.environ if base is None else base) | QUIET_ENV
    env["PATH"] = f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}"
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def stop_process_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM a process group, SIGKILL what is left after `grace_s`: none of the group outlives this call.

    The group is the leader's (started with `start_new_session=True`); its children may outlive it.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """The ServerApp runs in the SuperLink's working directory, not ours: give it absolute paths."""
    return replace(cfg, output_dir=str(cfg.output_path), cache_dir=str(cfg.cache_path))


def submit_run(
    cfg: RunConfig,
    connection: str,
    *,
    env: Mapping[str, str],
    app_dir: Path | None = None,
    federation_config: str | None = None,
    stream: bool = True,
    verbose: bool = False,
    resume_with: str = "",
    shown: Sequence[str] = (),
) -> RunOutcome:
    """`flwr run app_dir connection` with `cfg` as the run config; returns once the run ended.

    `app_dir`: the Flower app to submit; None: this checkout, or the installed package's app (app_folder.py).

    `shown`: warnings this process already printed (the preflight's), whose copies from the run are left out.

    Raises LaunchError when `flwr run` fails or the run did not complete, naming the log to read
    and, where the run stopped part way (a crashed SuperLink or coordinator), `resume_with`: the
    command that continues it from its last checkpoint, which a user would not guess.
    """
    cfg = absolute_paths(cfg)
    app_dir = app_dir or app_folder(cfg.cache_path)
    run_dir = cfg.output_path
    if cfg.resume and (done := run_folder.completed(run_dir)) is not None:
        return RunOutcome(done, None)  # resuming a completed run does nothing, and writes nothing
    locking.check_free(run_dir)  # another run holds the folder: refuse before writing a byte into it
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = run_dir / "run-config.toml"
    atomic.write_text(overrides, tomli_w.dumps(to_nested(cfg)))
    status_path = run_dir / run_folder.STATUS
    argv = [flower_bin("flwr"), "run", str(app_dir), connection, "--run-config", str(overrides), "--stream"]
    if federation_config:
        argv += ["--federation-config", federation_config]
    log_path = run_dir / "run.log"
    started = time.time()
    console = ConsoleFilter(verbose) if stream else None
    if console is not None:
        console.already_shown(shown)
    returncode, flower_run_id = _follow(
        argv, env=env, cwd=app_dir, log_path=log_path, console=console, append=cfg.resume
    )
    then = f"; the checkpoints it wrote are kept: continue it with `{resume_with}`" if resume_with else ""
    if returncode != 0:
        raise LaunchError(f"flwr run exited with code {returncode} before the run completed; see {log_path}{then}")
    # a status.json older than this launch is an earlier run's verdict, never this one's
    if not status_path.exists() or status_path.stat().st_mtime < started - 1.0:
        raise LaunchError(f"the run ended without writing {status_path}; see {log_path}{then}")
    status = json.loads(status_path.read_text(encoding="utf-8"))
    if status.get("status") != "completed":
        raise RunFailed(
            f"run {status.get('run_id', '?')} FAILED: {status.get('reason') or 'see the log'}; "
            f"no model exported; see {log_path}"
        )
    return RunOutcome(status, flower_run_id)


def _follow(
    argv: list[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    log_path: Path,
    console: ConsoleFilter | None,
    append: bool = False,
) -> tuple[int, int | None]:
    """Run `argv`, every line to `log_path`, what `console` shows to stdout; (exit code, Flower's run id).

    A resumed run appends to the log, so the interrupted attempt's lines stay readable.
    """
    flower_run_id = None
    with log_path.open("a" if append else "w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            argv,
            env=dict(env),
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
        )
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                log.write(ANSI.sub("", line))  # a log file is read with less or grep, not a terminal
                log.flush()
                if flower_run_id is None and (found := _FLOWER_RUN_ID.search(line)):
                    flower_run_id = int(found.group(1))
                if console is not None and (shown := console.show(line)) is not None:
                    print(shown, flush=True)
        finally:
            proc.stdout.close()
            returncode = proc.wait()
    return returncode, flower_run_id
