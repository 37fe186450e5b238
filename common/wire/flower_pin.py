"""The Flower version fedtransfer's process tuning is written against, its source pins, and the quicker
retry of an object not there yet (issue 25).

Flower 1.41.0 moves every message as a tree of objects, each pulled on its own. When a pull asks for an
object its sender has not pushed yet, `pull_objects` (flwr/supercore/inflatable/inflatable_utils.py)
waits `initial_backoff`, 1 s (flwr/supercore/constant.py:48), doubling to 10 s. Every deployed message
met that wait at least once: a SuperNode creates the task before it has pulled the message's objects,
so the ClientApp its SuperExec starts asks for them too soon; a SuperNode sees a message the ServerApp
has not finished pushing; the ServerApp sees a reply whose objects are still on their way. Each such
wait was 1 s on a round of 2-4 s. `quick_object_pulls` makes the first retry OBJECT_RETRY_S later,
doubling as Flower's does to the same cap, in the process it runs in: the ServerApp
(server/federation/server_app.py), the SuperNode (deploy/pacing.py) and the zygote whose ClientApps
inherit it (deploy/superexec_zygote.py). Flower's own default stays in every other process.

It changes a default of one Flower version's function, so it is pinned like the SuperNode's pacing:
the version and the sha256 of `pull_objects`' source must be the ones below, else Flower's 1 s stays
and the caller says why in one line. The standard library only: the zygote imports this before it forks.
"""

from __future__ import annotations

import hashlib
import inspect
import operator
from importlib.metadata import version
from types import ModuleType

FLOWER_VERSION = "1.41.0"
OBJECT_RETRY_S = 0.05  # the first retry of an object not there yet (Flower: 1 s), doubling to Flower's cap
# sha256 of inspect.getsource(pull_objects) in flwr 1.41.0
PULL_OBJECTS_SHA256 = "31bb2de46b450e6acfadb7a8bb15e3f2074bb112199826a40a5eaa648bad5b2b"


def flower_version() -> str:
    return version("flwr")


def source_digest(module: ModuleType, qualname: str) -> str:
    """sha256 of the source of `module`'s function or method `qualname` ("f" or "Class.method"): what a pin compares."""
    return hashlib.sha256(inspect.getsource(operator.attrgetter(qualname)(module)).encode()).hexdigest()


def pin_refusal(module: ModuleType, qualname: str, digest: str) -> str | None:
    """One line naming `module`'s `qualname` where its source no longer hashes to `digest` (flwr FLOWER_VERSION's
    sha256, what a pin was written against); None where it does."""
    if source_digest(module, qualname) != digest:
        return f"{module.__file__}: {qualname} differs from flwr {FLOWER_VERSION}'s"
    return None


def quick_object_pulls(module: ModuleType | None = None) -> str | None:
    """Flower's `pull_objects` retries after OBJECT_RETRY_S in this process; None when done, else why not (one line)."""
    installed = flower_version()
    if installed != FLOWER_VERSION:
        return f"flwr {installed} is installed; quicker object pulls are for flwr {FLOWER_VERSION} only"
    if module is None:
        from flwr.supercore.inflatable import inflatable_utils as module
    if (refused := pin_refusal(module, "pull_objects", PULL_OBJECTS_SHA256)) is not None:
        return refused
    module.pull_objects.__kwdefaults__["initial_backoff"] = OBJECT_RETRY_S
    return None
