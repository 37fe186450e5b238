"""The SuperExec's ClientApp zygote (issue 25): it forks real `flwr-clientapp` runs, reaps them, only for its owner.

The zygote runs in a fresh interpreter (tests/zygote_probe.py), as `deploy site` runs it, never in
pytest's own process: a zygote must be forked before threads start.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fedtransfer.deploy import pacing, superexec_zygote
from fedtransfer.server.launch.launcher import flower_env
from flwr.supercore.superexec.executor import subprocess_executor

from tests.deploy_harness import free_ports

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def _probe(*argv: str, seen: list[str] | None = None) -> Iterator[tuple[subprocess.Popen[str], int, int, int]]:
    """tests/zygote_probe.py with `argv`: the process, its zygote's pid, its socket's fd, the child's pid.

    The lines read up to the child's pid are appended to `seen`.
    """
    seen = [] if seen is None else seen
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.zygote_probe", *argv],
        cwd=REPO,
        env=flower_env() | {"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        seen.append(proc.stdout.readline())
        zygote, fd = map(int, re.fullmatch(r"zygote (\d+) fd (\d+)\n", seen[-1]).groups())
        child = next(
            int(m.group(1)) for line in proc.stdout if seen.append(line) or (m := re.match(r"child (\d+)", line))
        )
        yield proc, zygote, fd, child
    finally:
        proc.stdin.close()  # the probe's cue to end its zygote
        assert proc.wait(timeout=30) == 0


def _stat(pid: int) -> dict[str, str] | None:
    """State, parent and process group of `pid`; None once it is gone (reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    return {"state": fields[0], "ppid": fields[1], "pgrp": fields[2]}


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while _stat(pid) is not None:
        assert time.monotonic() < deadline, f"{pid} is still there: {_stat(pid)} (a zombie: not reaped)"
        time.sleep(0.05)


def test_the_zygote_forks_a_child_that_runs_the_argv_and_reaps_it() -> None:
    """`flwr-clientapp --help` forked: Flower's own usage text on the SuperExec's output, then no zombie."""
    with _probe("--help") as (proc, _zygote, _fd, child):
        usage = next(line for line in proc.stdout if "usage:" in line)
        assert usage.startswith("usage: flwr-clientapp ")  # its sys.argv[0] is the console script's
        _wait_gone(child)


def _ignored(pid: int) -> int:
    """The signals process `pid` ignores, as a bit mask (bit n - 1 for signal n)."""
    return int(re.search(r"SigIgn:\s*(\w+)", Path(f"/proc/{pid}/status").read_text()).group(1), 16)


def test_a_forked_clientapp_is_the_process_popen_would_have_started() -> None:
    """Same process group, its own name, none of the zygote's ignored signals, killable and then reaped."""
    (dead,) = free_ports(1)
    argv = ["--runtime-api-address", f"127.0.0.1:{dead}", "--token", "t", "--insecure"]
    with _probe(*argv) as (proc, zygote, _fd, child):
        try:
            next(line for line in proc.stdout if "Start `flwr-clientapp` process" in line)  # Flower's main runs
            stat = _stat(child)
            assert stat is not None and stat["state"] != "Z"
            assert int(stat["ppid"]) == zygote and int(stat["pgrp"]) == proc.pid  # the SuperExec's group, as Popen's
            assert Path(f"/proc/{child}/comm").read_text().strip() == "flwr-clientapp"
            # SIGTERM and SIGINT: the zygote ignores both, its child must not. It ignores what Popen's child would
            # inherit from this test process: a shell's background job (CI's, say) starts with SIGINT ignored.
            stop = 1 << (15 - 1) | 1 << (2 - 1)
            assert _ignored(child) & stop == _ignored(os.getpid()) & stop
        finally:
            os.kill(child, 15)  # it retries its dead Runtime API for good; SIGTERM ends it, as a fresh one
        _wait_gone(child)


@pytest.mark.skipif(os.geteuid() != 0, reason="acting as another local user needs root to switch to it")
def test_another_local_user_cannot_reach_the_zygotes_channel() -> None:
    """A socketpair: no path to connect to, and the ends' descriptors are the site account's alone."""
    from tests.test_local_users import _as_nobody

    (dead,) = free_ports(1)
    argv = ["--runtime-api-address", f"127.0.0.1:{dead}", "--token", "t", "--insecure"]
    with _probe(*argv) as (proc, zygote, fd, child):
        try:
            ends = {f"/proc/{proc.pid}/fd/{fd}"} | {
                str(p) for p in Path(f"/proc/{zygote}/fd").iterdir() if os.readlink(p).startswith("socket:")
            }
            inodes = {os.readlink(end)[len("socket:[") : -1] for end in ends}
            unix = [line.split() for line in Path("/proc/net/unix").read_text().splitlines()[1:]]
            assert inodes <= {row[6] for row in unix}  # Unix sockets, ...
            assert all(len(row) == 7 for row in unix if row[6] in inodes)  # ... none with a path
            for end in ends:
                assert _as_nobody(lambda end=end: str(os.open(end, os.O_RDWR))) == "error PermissionError"
            assert _as_nobody(lambda: str(os.listdir(f"/proc/{zygote}/fd"))) == "error PermissionError"
        finally:
            os.kill(child, 15)
            _wait_gone(child)


def test_a_dead_zygote_falls_back_to_flowers_popen_in_one_line() -> None:
    seen: list[str] = []
    with _probe("--kill", "--help", seen=seen) as (proc, _zygote, _fd, _child):
        seen += [next(line for line in proc.stdout if "usage:" in line)]
    assert sum("has died" in line for line in seen) == 1, seen
    assert "starting ClientApps with Flower's own Popen" in "".join(seen)
    assert seen[-2].endswith("popen Popen\n") and seen[-1].startswith("usage: flwr-clientapp")


_AT_FORK = """
import os, sys
from fedtransfer.cli.main import main
from fedtransfer.deploy.superexec_zygote import Zygote

def start():
    loaded = sorted(m for m in ("grpc", "numpy", "flwr", "torch") if m in sys.modules)
    print(loaded, len(os.listdir("/proc/self/task")), flush=True)
    os._exit(0)

Zygote.start = start
main(["deploy", "zygote-superexec", "flower-superexec", "--help"])
"""


def test_the_command_forks_its_zygote_before_grpc_or_a_thread() -> None:
    """`fedtransfer deploy zygote-superexec` (as `deploy site` runs it) reaches the fork with none of them loaded."""
    said = subprocess.run(
        [sys.executable, "-c", _AT_FORK],
        env=flower_env() | {"PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert said == "[] 1\n"


def test_flowers_launch_is_the_one_the_zygote_patches() -> None:
    """Fails when Flower's SubprocessExecutor.launch changes: the pin (and the zygote's Popen) must then be redone."""
    digest = pacing.source_digest(subprocess_executor, "SubprocessExecutor.launch")
    assert digest == superexec_zygote.LAUNCH_SOURCE_SHA256
    assert superexec_zygote.source_refusal(subprocess_executor) is None
    source = Path(subprocess_executor.__file__).read_text()
    launch = inspect.getsource(subprocess_executor.SubprocessExecutor.launch)
    assert source.count("subprocess.") == launch.count("subprocess.")  # its Popen is the module's only use


def test_another_flower_gets_the_plain_superexec_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(superexec_zygote, "flower_version", lambda: "1.42.0")

    def start() -> superexec_zygote.Zygote:
        raise AssertionError("no zygote is forked for another Flower")

    assert superexec_zygote.start_zygote(start) is None
    said = capsys.readouterr().err
    assert said.count("\n") == 1 and "flwr 1.42.0 is installed" in said and "1.41.0 only" in said


def test_changed_launch_code_is_refused_naming_the_file() -> None:
    class Changed:
        def launch(self) -> None:
            """Not Flower's."""

    module = type(sys)("changed_executor")
    module.__file__ = "/site-packages/flwr/x/subprocess_executor.py"
    module.SubprocessExecutor = Changed
    refused = superexec_zygote.source_refusal(module)
    assert refused is not None and "\n" not in refused and "subprocess_executor.py" in refused
