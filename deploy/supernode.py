"""Run a site's SuperNode until it exits, retrying, within a bound, while the SuperLink refuses it.

flwr 1.41 refuses to activate a SuperNode whose key the SuperLink does not know, and also one
whose previous SuperNode crashed less than a heartbeat ago (up to ~80 s: the SuperLink still
counts it online). Both end in the same Flower error (exit code 305, "Failed to activate
SuperNode"), so a restarted site used to die with a message that suggested an unregistered key.
`run_supernode` says which causes are possible, waits and tries again; signals are passed on to
the SuperNode so a service manager can stop it as if it ran the SuperNode itself.
"""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from types import FrameType
from typing import IO

ACTIVATION_REFUSED = "Failed to activate SuperNode"
_FLOWER_EXIT_BLOCK = "Exit Code:"  # Flower's multi-line error report starts here
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_DRAIN_S = 2.0  # after the SuperNode exits, how long its last lines may take to arrive


class ActivationError(RuntimeError):
    """The SuperLink kept refusing the site for longer than the retry bound."""


def run_supernode(argv: list[str], env: Mapping[str, str], site: str, retry_for: float, pause: float = 10.0) -> int:
    """Run `argv` (a flower-supernode command) and return its exit code once it ends for good."""
    deadline = time.monotonic() + retry_for
    stopping: list[int] = []
    while True:
        code, refused = _run_once(argv, env, stopping)
        if not refused or stopping:
            return code
        if time.monotonic() + pause > deadline:
            raise ActivationError(
                f"the SuperLink refused to activate site {site} for {retry_for:.0f} s (Flower exit code 305): its key "
                f"is not registered (on the SuperLink host: `fedtransfer deploy register ... {site}`), or a crashed "
                "SuperNode of this site still counts as online (it lapses within ~80 s; raise --retry-for)"
            )
        print(
            f"fedtransfer: the SuperLink refused to activate site {site} (Flower exit code 305): it still counts "
            f"this site's crashed SuperNode as online until its heartbeat lapses (up to ~80 s), or the key is not "
            f"registered; retrying in {pause:.0f} s (until {retry_for:.0f} s have passed)",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(pause)


def _run_once(argv: list[str], env: Mapping[str, str], stopping: list[int]) -> tuple[int, bool]:
    """One SuperNode process: its output passes through, except Flower's report of a refused activation."""
    proc = subprocess.Popen(
        argv, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1
    )

    def forward(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)
        proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in _FORWARDED}
    held: list[str] = []
    refused = False
    try:
        assert proc.stdout is not None
        for line in _lines_until_exit(proc, proc.stdout):
            refused = refused or ACTIVATION_REFUSED in line
            if held or _FLOWER_EXIT_BLOCK in line:
                held.append(line)  # shown below only if it is not the refusal we explain ourselves
            else:
                sys.stdout.write(line)
                sys.stdout.flush()
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not refused:
        sys.stdout.writelines(held)
    return code, refused


def _lines_until_exit(proc: subprocess.Popen[str], stream: IO[str]) -> Iterator[str]:
    """The process's output lines until it has exited and its last lines are read.

    Reading to end of file is not enough: a child the SuperNode started (Flower's `flower-superexec`)
    inherits the pipe and can outlive it, so end of file may never come, and a site restarting after
    a refused activation would hang with its SuperNode unreaped. A daemon thread reads; this stops
    at end of file, or `_DRAIN_S` after the process exited.
    """
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True, name="supernode-output").start()
    exited_at: float | None = None
    while exited_at is None or time.monotonic() - exited_at < _DRAIN_S:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            if exited_at is None and proc.poll() is not None:
                exited_at = time.monotonic()
            continue
        if line is None:
            return
        yield line
