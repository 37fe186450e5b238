"""Flower's SuperNode that SIGKILLs itself between two objects of its first reply (tests only).

`python -m tests.halfpush_supernode flower-supernode ARGS...` runs Flower 1.41's own SuperNode entry
point, with one change: its object pushes to the SuperLink go one at a time, and right after the
first one is stored the process sends itself SIGKILL. That is the crash of issue 24 ("a site killed
right after it sent its update"): the reply message and its object tree are at the SuperLink, some
of its objects never arrive, and the ServerApp's Grid keeps asking for them until the SuperLink
drops the half-pushed reply ("Reply message objects are unavailable"). A kill -9 from outside
lands in that window only by chance (a small reply is pushed in milliseconds); this places the
same signal there every time.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

KILLED_AFTER = "halfpush: object 1 of the reply stored; SIGKILL now"


def install() -> None:
    """Serialise the SuperNode's PushObject calls and die after the first returns (the SuperLink stored it)."""
    from flwr.supernode.fleet_http_client import FleetHttpClient

    push = FleetHttpClient.PushObject
    lock = threading.Lock()  # the SuperNode pushes objects from a thread pool: none may slip past the kill

    def push_then_die(self: FleetHttpClient, request: Any) -> Any:
        with lock:
            push(self, request)
            print(KILLED_AFTER, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    FleetHttpClient.PushObject = push_then_die


def main(flower_argv: list[str]) -> None:
    install()
    from flwr.supernode.cli import flower_supernode

    sys.argv = list(flower_argv)
    flower_supernode()


if __name__ == "__main__":
    main(sys.argv[1:])
