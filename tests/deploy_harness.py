"""Real-process flwr 1.41 deployment on 127.0.0.1 for tests (not a test module).

``local_deployment`` creates credentials, starts ``flower-superlink`` with TLS and
SuperNode authentication on a free loopback port, registers the sites, starts one
``flower-supernode`` per site with the caller's ``--node-config``, waits until
every site is activated, and on exit (also on errors) stops every process it
started, including detached grandchildren such as the SuperLink's SuperExec.

With ``deploy_site`` (site name -> its site YAML) those sites are started as operators start
them, with ``fedtransfer deploy site``: the SuperNode plus the site's worker, which answers the
ClientApps' messages (client/site_worker.py).

Example::

    with local_deployment(tmp_path, {"alpha": site_node_config(p)}) as dep:
        result = dep.run_app(app_dir, {"num-rounds": 1}, timeout=120)

Linux only: process trees are read from /proc.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from fedtransfer.common.data.sources import SiteData
from fedtransfer.deploy.credentials import DeploymentCredentials, init_deployment
from fedtransfer.deploy.launch import (
    LOOPBACK,
    ConfigValue,
    format_config,
    register_site,
    site_node_config,
    superlink_argv,
    supernode_argv,
    write_flwr_config,
)
from fedtransfer.deploy.supernode import ACTIVATION_REFUSED  # also after a crash, while the old node counts as online
from fedtransfer.server.launch.launcher import BIN_DIR, flower_env

CONNECTION = "harness"
_STOP_GRACE_S = 5.0
_RUN_ID_RE = re.compile(r"Successfully started run (\d+)")
_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before any fork


@dataclass
class ManagedProcess:
    """A process started by the harness, in its own process group."""

    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path
    stopped: bool = False

    def log_text(self) -> str:
        """Everything the process wrote to stdout/stderr so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def alive(self) -> bool:
        """True while the process has not exited."""
        return self.popen.poll() is None


@dataclass
class AppRun:
    """Outcome of one ``flwr run`` call, with the run status from ``flwr ls``.

    flwr 1.41 exits 0 from ``flwr run --stream`` even when the ServerApp fails,
    so ``status`` (e.g. ``finished:completed``/``finished:failed``) is the verdict.
    """

    run_id: int | None
    returncode: int
    output: str
    status: str | None
    status_details: str

    @property
    def ok(self) -> bool:
        """True if the CLI succeeded and the run finished successfully."""
        return self.returncode == 0 and self.status == "finished:completed"


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on loopback (held together so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _die_with_harness() -> None:
    """In the child: get SIGKILL if the harness dies, so a crash leaks nothing."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _descendants(pid: int) -> list[int]:
    """All live descendants of ``pid``, found before signalling so none escape."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal(pid: int, sig: signal.Signals, *, group: bool) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def stop_process(proc: ManagedProcess, *, graceful: bool = True) -> None:
    """Stop ``proc``, its process group and detached descendants; reap it.

    Runs once per process: signalling a reaped group id again could hit an
    unrelated group that reused the pid.
    """
    if proc.stopped:
        return
    proc.stopped = True
    strays = _descendants(proc.popen.pid)
    if proc.alive():
        sig = signal.SIGTERM if graceful else signal.SIGKILL
        _signal(proc.popen.pid, sig, group=True)
        try:
            proc.popen.wait(timeout=_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            _signal(proc.popen.pid, signal.SIGKILL, group=True)
            proc.popen.wait(timeout=_STOP_GRACE_S)
    _signal(proc.popen.pid, signal.SIGKILL, group=True)  # group members left behind
    deadline = time.monotonic() + _STOP_GRACE_S
    for pid in strays:
        if graceful:
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)  # detached children watch their parent and exit
        _signal(pid, signal.SIGKILL, group=False)


class LocalDeployment:
    """Handle on a running loopback deployment; build with ``local_deployment``."""

    def __init__(
        self,
        workdir: Path,
        creds: DeploymentCredentials,
        node_configs: Mapping[str, str],
        deploy_site: Mapping[str, Path] | None = None,
    ) -> None:
        self.workdir = workdir
        self.creds = creds
        self.node_configs = dict(node_configs)
        self.deploy_site = dict(deploy_site or {})  # started with `fedtransfer deploy site` (and its worker)
        self.superlink_port, *site_ports = free_ports(1 + len(creds.sites))
        self.site_ports = dict(zip(creds.sites, site_ports, strict=True))
        self.superlink_address = f"{LOOPBACK}:{self.superlink_port}"
        self.connection = CONNECTION
        self.flwr_home = workdir / "operator" / "flwr-home"
        self.env = self._env(self.flwr_home)
        self.node_ids: dict[str, int] = {}
        self.processes: list[ManagedProcess] = []
        self.sites: dict[str, ManagedProcess] = {}
        self.superlink: ManagedProcess | None = None

    def _env(self, flwr_home: Path) -> dict[str, str]:
        flwr_home.mkdir(parents=True, exist_ok=True)
        return flower_env(flwr_home)

    def spawn(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> ManagedProcess:
        """Start ``argv`` in its own process group; it is stopped at teardown.

        Output goes to ``logs/<name>.log``; a reused name gets a ``-N`` suffix.
        """
        taken = {proc.name for proc in self.processes}
        unique, count = name, 1
        while unique in taken:
            count += 1
            unique = f"{name}-{count}"
        log_path = self.workdir / "logs" / f"{unique}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                argv,
                cwd=self.workdir,
                env=dict(self.env if env is None else env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_harness,
            )
        proc = ManagedProcess(unique, argv, popen, log_path)
        self.processes.append(proc)
        return proc

    def start_superlink(self, timeout: float = 60.0) -> None:
        """Start the SuperLink and return once its HTTPS port accepts connections."""
        argv = superlink_argv(
            self.creds,
            port=self.superlink_port,
            executable=str(BIN_DIR / "flower-superlink"),
            bounded=True,  # as `fedtransfer deploy superlink` runs it
        )
        env = self._env(self.workdir / "superlink" / "flwr-home")
        self.superlink = self.spawn("superlink", argv, env)
        deadline = time.monotonic() + timeout
        while True:
            if not self.superlink.alive():
                raise RuntimeError(f"SuperLink exited:\n{self.superlink.log_text()}")
            try:
                socket.create_connection((LOOPBACK, self.superlink_port), 1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("SuperLink did not start listening") from None
                time.sleep(0.2)

    def register(self, site: str) -> int:
        """Register ``site``'s public key through the Control API (TLS)."""
        node_id = register_site(
            self.creds,
            site,
            self.connection,
            env=self.env,
            executable=str(BIN_DIR / "flwr"),
        )
        self.node_ids[site] = node_id
        return node_id

    def site_argv(self, site: str, node_config: str | None = None, port: int | None = None) -> list[str]:
        """The exact ``flower-supernode`` command line this harness uses for a site.

        Pass another ``port`` to run a second SuperNode next to a running one.
        """
        return supernode_argv(
            self.creds,
            site,
            superlink=self.superlink_address,
            node_config=self.node_configs[site] if node_config is None else node_config,
            port=self.site_ports[site] if port is None else port,
            executable=str(BIN_DIR / "flower-supernode"),
        )

    def start_site(
        self,
        site: str,
        *,
        node_config: str | None = None,
        wait: bool = True,
        timeout: float = 180.0,  # a `deploy site` start imports torch for its worker before the SuperNode starts
    ) -> ManagedProcess:
        """Start ``site``'s SuperNode; with ``wait``, return once it is activated.

        After a crash the SuperLink keeps the node "online" until its heartbeat
        expires and refuses re-activation meanwhile, so waiting retries that.
        """
        if (running := self.sites.get(site)) is not None and running.alive():
            raise RuntimeError(f"site {site!r} is already running")
        env = self._env(self.workdir / "sites" / site / "flwr-home")
        deadline = time.monotonic() + timeout
        if node_config is None and site in self.deploy_site:
            # a new port each start: `deploy site` checks its port with a plain bind, which the
            # stopped SuperNode's lingering connections (TIME_WAIT) still block for a while
            (self.site_ports[site],) = free_ports(1)
            argv = [
                str(BIN_DIR / "fedtransfer"),
                "deploy",
                "site",
                "--config",
                str(self.deploy_site[site]),
                "--credentials",
                str(self.creds.root),
                "--superlink",
                self.superlink_address,
                "--port",
                str(self.site_ports[site]),
            ]
        else:
            argv = self.site_argv(site, node_config)
        while True:
            proc = self.spawn(site, argv, env)
            self.sites[site] = proc
            if not wait:
                return proc
            try:
                self._wait_activated(site, proc, deadline)
                return proc
            except _ActivationRefusedError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"site {site!r} was never re-activated") from None
                time.sleep(5.0)

    def _wait_activated(self, site: str, proc: ManagedProcess, deadline: float) -> None:
        marker = f"SuperNode ID: {self.node_ids.get(site, '')}"
        while marker not in proc.log_text():
            if not proc.alive():
                log = proc.log_text()
                if ACTIVATION_REFUSED in log and site in self.node_ids:
                    raise _ActivationRefusedError(site)
                raise RuntimeError(f"SuperNode {proc.name} exited:\n{log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"SuperNode {proc.name} did not connect in time")
            time.sleep(0.2)

    def wait_connected(self, sites: Collection[str] | None = None, timeout: float = 60.0) -> None:
        """Block until the given (default: all registered) sites are activated."""
        deadline = time.monotonic() + timeout
        for site in self.node_configs if sites is None else sites:
            self._wait_activated(site, self.sites[site], deadline)

    def kill_site(self, site: str, *, graceful: bool = False) -> None:
        """Stop a site's SuperNode: SIGKILL (a crash) or SIGTERM (clean leave)."""
        stop_process(self.sites[site], graceful=graceful)

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI as the operator (isolated FLWR_HOME, TLS connection)."""
        return subprocess.run(
            [str(BIN_DIR / "flwr"), *args],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def run_app(
        self,
        app_dir: Path,
        run_config_overrides: Mapping[str, ConfigValue] | None = None,
        *,
        stream: bool = True,
        timeout: float = 300.0,
    ) -> AppRun:
        """``flwr run <app_dir> <connection>``; with ``stream`` wait for the run's end.

        On timeout the run is stopped on the SuperLink and TimeoutError raised.
        """
        args = ["run", str(app_dir), self.connection]
        if run_config_overrides:
            args += ["--run-config", format_config(run_config_overrides)]
        if stream:
            args.append("--stream")
        try:
            done = self.flwr(*args, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            output = _text(err.stdout) + _text(err.stderr)
            if match := _RUN_ID_RE.search(output):
                self.flwr("stop", match.group(1), self.connection)
            raise TimeoutError(f"flwr run exceeded {timeout}s:\n{output}") from err
        output = done.stdout + done.stderr
        if not (match := _RUN_ID_RE.search(output)):
            return AppRun(None, done.returncode, output, None, "")
        listed = self.flwr("ls", self.connection, "--run-id", match.group(1), "--format", "json")
        try:
            run = json.loads(listed.stdout)["runs"][0]
        except (json.JSONDecodeError, KeyError, IndexError):
            run = {"status-details": listed.stdout + listed.stderr}
        return AppRun(
            int(match.group(1)),
            done.returncode,
            output,
            run.get("status"),
            run.get("status-details", ""),
        )

    def stop_all(self) -> None:
        """Stop every process this harness started, newest first."""
        for proc in reversed(self.processes):
            stop_process(proc)


def write_npz_site(home: Path, name: str, share: SiteData, **settings: object) -> str:
    """A deployed site's own folder: its share of images as a MedMNIST-style .npz and its site.yaml.

    Returns the SuperNode's ``--node-config``; ``settings`` go into the YAML (e.g. a policy).
    """
    home.mkdir(parents=True, exist_ok=True)
    images = np.concatenate([share.train.inputs, share.test.inputs])[..., 0]
    labels = np.concatenate([share.train.labels, share.test.labels])
    np.savez(home / "digits.npz", train_images=images, train_labels=labels)
    site = {"name": name, "data_source": "npz", "data_path": "digits.npz", "device": "cpu", "state_dir": "state"}
    (home / "site.yaml").write_text(yaml.safe_dump(site | settings))
    return site_node_config(home / "site.yaml")


class _ActivationRefusedError(RuntimeError):
    """The SuperLink refused to activate a registered node (still marked online)."""


def _text(data: bytes | str | None) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""


@contextmanager
def local_deployment(
    workdir: Path,
    node_configs: Mapping[str, str],
    *,
    extra_sites: Collection[str] = (),
    connect_timeout: float = 90.0,
    deploy_site: Mapping[str, Path] | None = None,
) -> Iterator[LocalDeployment]:
    """Run SuperLink + one registered, connected SuperNode per ``node_configs`` item.

    ``extra_sites`` get credentials only (not registered, not started), for
    negative tests. Everything started is torn down when the block exits.
    """
    workdir = Path(workdir)
    creds = init_deployment(workdir / "credentials", [*node_configs, *extra_sites], hosts=[])
    dep = LocalDeployment(workdir, creds, node_configs, deploy_site)
    write_flwr_config(
        dep.flwr_home,
        address=dep.superlink_address,
        root_certificates=creds.ca_cert,
        name=dep.connection,
    )
    try:
        dep.start_superlink()
        for site in node_configs:
            dep.register(site)
        for site in node_configs:
            dep.start_site(site, wait=False)
        dep.wait_connected(timeout=connect_timeout)
        yield dep
    finally:
        dep.stop_all()
