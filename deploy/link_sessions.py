"""The SuperLink with object-push sessions bounded to the heartbeat window (issue 24).

A site that sends its reply pushes the message, then its objects, in one push session. Flower
1.41.0 keeps a session whose objects stop coming for `OBJECT_PUSH_SESSION_TTL_SECONDS = 180`
(`flwr/supercore/constant.py:45`), and only then drops the half-pushed reply: a site killed right
after it started sending stalled its round for 199 s, more than twice the ~80 s after which the
SuperLink counts a silent site as gone (heartbeat 30 s × patience 2, `flwr/common/constant.py:44`,
`:51`). The value cannot be set, and both state classes read their module's copy of the name
(`flwr/supercore/corestate/in_memory_corestate.py:342`, `:429`; `sql_corestate.py:348`, `:494`).

`fedtransfer deploy superlink` (and the test harness) therefore run the SuperLink as
`fedtransfer deploy bounded-superlink flower-superlink ARGS...`: this sets that name in the
two modules to `SESSION_TTL_S` and runs Flower's own entry point in this process. The TTL is
refreshed by every object stored, so it bounds the pause between two objects of one reply, not
a reply's whole upload: 60 s still lets a site on a slow link send one object of a few MB.

Like `fedtransfer.deploy.pacing` it rewrites one Flower version's private code, so it checks the
version and the source of the functions that read the name, and refuses anything else in one line.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from fedtransfer.common.wire.flower_pin import FLOWER_VERSION, flower_version, source_digest
from fedtransfer.deploy.pacing import FlowerPinError

SESSION_TTL_S = 60  # < the ~80 s after which the SuperLink counts a silent site as gone
FLOWER_SESSION_TTL_S = 180
TTL_NAME = "OBJECT_PUSH_SESSION_TTL_SECONDS"
# sha256 of inspect.getsource of each function that reads TTL_NAME, in flwr 1.41.0
PINNED_SOURCES = {
    "flwr.supercore.corestate.in_memory_corestate": {
        "InMemoryCoreState.start_session": "232e93255876352c65d0e01cebab5a2b8be68feed3d57334bfed721c34a39581",
        "InMemoryCoreState.store_object": "2f952e079f4dadd4c15fbb18d61a8ae14d18ccc8b4aeb5d9500d4b2fa8e44673",
    },
    "flwr.supercore.corestate.sql_corestate": {
        "SqlCoreState.start_session": "1921ed72bdf87baf41eb31ca6bebebdb9e3e3c97b4b6b8f61e672ece153d7b7b",
        "SqlCoreState.store_object": "903590e226814f4ab60292a958da882e8608db38a732c185e82efd9452b6e548",
    },
}


COMMAND = (
    "bounded-superlink"  # the internal `fedtransfer deploy` command that runs Flower's program through this module
)


def check_flower() -> list[ModuleType]:
    """Flower's two core-state modules, once the version and the functions that read the TTL are the pinned ones."""
    installed = flower_version()
    if installed != FLOWER_VERSION:
        raise FlowerPinError(
            f"flwr {installed} is installed; `fedtransfer deploy superlink` bounds the push sessions of flwr "
            f"{FLOWER_VERSION} only: install flwr=={FLOWER_VERSION}"
        )
    modules = []
    for name, pins in PINNED_SOURCES.items():
        module = importlib.import_module(name)
        changed = [q for q, digest in pins.items() if source_digest(module, q) != digest]
        if changed or getattr(module, TTL_NAME, None) != FLOWER_SESSION_TTL_S:
            raise FlowerPinError(
                f"{module.__file__}: {', '.join(changed) or TTL_NAME} differ from flwr {FLOWER_VERSION}'s "
                f"(a patched Flower?); `fedtransfer deploy superlink` bounds that code only: "
                f"reinstall flwr=={FLOWER_VERSION}"
            )
        modules.append(module)
    return modules


def install(modules: list[ModuleType], ttl_s: int = SESSION_TTL_S) -> None:
    for module in modules:
        setattr(module, TTL_NAME, ttl_s)


def bounded_argv(flower_argv: list[str], python: str = sys.executable) -> list[str]:
    """The command line running `flower_argv` (a flower-superlink command) through this module."""
    return [python, "-m", "fedtransfer.cli", "deploy", COMMAND, *flower_argv]


def main(flower_argv: list[str]) -> int:
    """`fedtransfer deploy bounded-superlink flower-superlink ARGS...`: Flower's SuperLink, bounded."""
    try:
        modules = check_flower()
    except FlowerPinError as err:
        print(f"fedtransfer: error: {err}", file=sys.stderr)
        return 2
    install(modules)
    print(f"fedtransfer: SuperLink push sessions expire after {SESSION_TTL_S} s without an object", flush=True)
    from flwr.superlink.cli import flower_superlink

    sys.argv = list(flower_argv)
    flower_superlink()
    return 0
