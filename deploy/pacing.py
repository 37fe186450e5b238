"""A site's SuperNode without Flower 1.41's fixed idle waits (issue 25, item 2).

Flower 1.41.0's SuperNode (`flwr/supernode/start_client_internal.py`) sleeps a fixed 3 s after
every pull that found no message (line 263), so a message waits 1.5 s on average before its site
sees it, and it polls every 0.5 s for its ClientApp's reply (line 470) and for each of the reply's
objects (line 506). None of these can be set. `deploy site` therefore runs the SuperNode as
`fedtransfer deploy paced-supernode flower-supernode ARGS...`: this module replaces the `time`
that module sees with one whose `sleep(3)` is paced (`Pacer`) and whose `sleep(0.5)` is short, then
runs Flower's own `flower-supernode` entry point in this process. Everything else is Flower's.

The pacing: a pull every `fast_s` for `fast_for_s` after the SuperNode starts or receives a
message, so the rounds of a running run find their site at once; then pauses growing by `growth`
up to Flower's own 3 s, so an idle federation loads the SuperLink as much as before
(benchmarks/idle_polling.py measures both).

It rewrites one Flower version's private code, so it refuses any other: `check_flower` compares
the installed version and the source of the functions whose waits it changes with what this
module was written against, and says in one line what differs.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from fedtransfer.common.errors import InputError
from fedtransfer.common.wire.flower_pin import FLOWER_VERSION, flower_version, quick_object_pulls, source_digest

FLOWER_IDLE_S = 3.0  # start_client_internal.py:263, after a pull that found no message
FLOWER_REPLY_POLL_S = 0.5  # start_client_internal.py:470 and :506, waiting for the ClientApp's reply
# sha256 of inspect.getsource of each function whose waits are changed or which is wrapped, in flwr 1.41.0
PINNED_SOURCES = {
    "start_client_internal": "9e89a6eb68fbec6821e817cd2c09f7894fc7b0f5725c2365b19a7122307f11f3",
    "_push_messages": "00bb86faffdec114db87e7f716af2acd901d12284e44f51f5c2a84704db05f64",
    "_pull_and_store_message": "eaf5d0e36dc34e4cf46a490511d077ac55cc8edbbcdbe938c1f6dbcb758628be",
}
SUPERNODE_MODULE = "flwr.supernode.start_client_internal"
# SuperExec's task polling (flwr/supercore/superexec/run_superexec.py:48-51, default 1 s), set for every
# Flower process fedtransfer starts (server/launch/launcher.py PACING_ENV; compose.yaml and systemd units too)
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


class FlowerPinError(InputError):
    """The installed Flower is not the one whose SuperNode code this module rewrites."""


@dataclass(frozen=True)
class Pacing:
    """How often an idle SuperNode asks the SuperLink for a message, and how often it checks for a reply."""

    fast_s: float = 0.2  # a message waits 0.1 s on average, not 1.5 s
    fast_for_s: float = 30.0  # longer than a round's aggregation, so a run's sites stay quick
    growth: float = 1.5  # each idle pull after that waits this much longer ...
    idle_s: float = FLOWER_IDLE_S  # ... up to Flower's own pause
    reply_poll_s: float = 0.02  # a local check of the SuperNode's own state: cheap


class Pacer:
    """The pause before the next pull: short right after a message, back to `idle_s` when idle for long."""

    def __init__(self, pacing: Pacing = Pacing(), clock: Callable[[], float] = time.monotonic) -> None:
        self.pacing = pacing
        self._clock = clock
        self._last_message = clock()
        self._pause = pacing.fast_s

    def saw_message(self) -> None:
        self._last_message = self._clock()
        self._pause = self.pacing.fast_s

    def idle_pause(self) -> float:
        if self._clock() - self._last_message >= self.pacing.fast_for_s:
            self._pause = min(self._pause * self.pacing.growth, self.pacing.idle_s)
        return self._pause


class _PacedTime:
    """`time` as the SuperNode module sees it: Flower's two fixed waits paced, everything else as is."""

    def __init__(self, pacer: Pacer, sleep: Callable[[float], None]) -> None:
        self._pacer = pacer
        self._sleep = sleep

    def sleep(self, seconds: float) -> None:
        if seconds == FLOWER_IDLE_S:
            self._sleep(self._pacer.idle_pause())
        elif seconds == FLOWER_REPLY_POLL_S:
            self._sleep(self._pacer.pacing.reply_poll_s)
        else:
            self._sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


COMMAND = "paced-supernode"  # the internal `fedtransfer deploy` command that runs the SuperNode through here


def check_flower(module: ModuleType | None = None) -> ModuleType:
    """Flower's SuperNode module, once its version and the functions paced are the ones pinned here."""
    installed = flower_version()
    if installed != FLOWER_VERSION:
        raise FlowerPinError(
            f"flwr {installed} is installed; `fedtransfer deploy site` paces the SuperNode of flwr {FLOWER_VERSION} "
            f"only: install flwr=={FLOWER_VERSION}"
        )
    if module is None:
        from flwr.supernode import start_client_internal as module  # Flower's, imported only when a site runs
    changed = [name for name, digest in PINNED_SOURCES.items() if source_digest(module, name) != digest]
    if changed:
        raise FlowerPinError(
            f"{module.__file__}: {', '.join(changed)} differ from flwr {FLOWER_VERSION}'s (a patched Flower?); "
            f"`fedtransfer deploy site` paces that code only: reinstall flwr=={FLOWER_VERSION}"
        )
    return module


def install(module: ModuleType, pacer: Pacer, sleep: Callable[[float], None] = time.sleep) -> None:
    """Pace `module`'s waits: its `time.sleep` goes through `pacer`, and each message pulled resets it."""
    pull = module._pull_and_store_message

    @functools.wraps(pull)
    def pull_and_note(*args: Any, **kwargs: Any) -> Any:
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            pacer.saw_message()
        return run_id

    module.time = _PacedTime(pacer, sleep)
    module._pull_and_store_message = pull_and_note


def paced_argv(flower_argv: list[str], python: str = sys.executable) -> list[str]:
    """The command line running `flower_argv` (a flower-supernode command) through this module."""
    return [python, "-m", "fedtransfer.cli", "deploy", COMMAND, *flower_argv]


def main(flower_argv: list[str]) -> int:
    """`fedtransfer deploy paced-supernode flower-supernode ARGS...`: Flower's SuperNode, paced."""
    try:
        module = check_flower()
    except FlowerPinError as err:
        print(f"fedtransfer: error: {err}", file=sys.stderr)
        return 2
    pacing = Pacing()
    install(module, Pacer(pacing))
    if (refused := quick_object_pulls()) is not None:
        print(f"fedtransfer: SuperNode: {refused}: it retries an object not there yet after Flower's 1 s", flush=True)
    print(
        f"fedtransfer: SuperNode pacing: a pull every {pacing.fast_s} s for {pacing.fast_for_s:.0f} s after a "
        f"message, then up to every {pacing.idle_s:.0f} s; reply checks every {pacing.reply_poll_s} s",
        flush=True,
    )
    from flwr.supernode.cli import flower_supernode

    sys.argv = list(flower_argv)
    flower_supernode()
    return 0
