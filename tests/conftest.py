"""Tests that start Flower, Ray or a deployment are marked `slow` from what they use, not by hand.

`make check` (`pytest -m "not slow" -n 2`) is the fast lane: minutes, where the whole suite takes
most of half an hour because about forty tests start real SuperLinks, SuperNodes, `flwr run`,
Ray clusters or deployments. A hand-written marker is forgotten on the next such test, and the fast
lane silently grows; so at collection every test's code is read: the test function, its fixtures,
and (transitively) the helpers of tests/ and benchmarks/ they name. A test that reaches one of
STARTERS (or `fedtransfer.cli.main.main`, or `python -m fedtransfer.cli`, with a process-starting
command), or that runs a benchmark
as a process (`python -m benchmarks.<name>`, minutes even at smoke size), is marked slow.

The check is of names in code, so it over-marks rather than misses; the runtime guard below
catches what it cannot see: in a run that leaves slow tests out, a test that still starts a
Flower or Ray executable fails at once, naming what it started and this file. The one over-marking
undone by hand is `@pytest.mark.refused_before_flower`: a `fedtransfer simulate` or `deploy run`
whose config the test expects refused (exit 2) before any process starts. Such a test stays in
the fast lane, where the guard fails it if Flower starts after all.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fedtransfer.cli import main as cli_main
from fedtransfer.server.launch import simulation
from fedtransfer.server.launch.launcher import BIN_DIR

from tests import deploy_harness, ray_cluster

# what starts Flower, Ray or a deployment when called (or, for a class, constructed and used)
STARTERS: tuple[Any, ...] = (
    simulation.simulate,
    simulation.simulation_superlink,
    deploy_harness.local_deployment,
    deploy_harness.LocalDeployment,
    ray_cluster.two_node_cluster,
)
# the same for Flower's own, named (module, function) rather than imported: `flwr.simulation` imports Ray, seconds
# of CPU in every xdist worker, and a test that calls it has imported it itself
NAMED_STARTERS = frozenset(
    {
        ("flwr.simulation.run_simulation", "run_simulation"),
        ("flwr.simulation.legacy_app", "start_simulation"),
        ("flwr.simulation", "start_simulation"),
    }
)
# `fedtransfer simulate` and `fedtransfer deploy superlink|site|run` start Flower processes (`main([...])` in a test)
DEPLOY_COMMANDS = frozenset({"superlink", "site", "run"})
# the same command run as a process of its own (`python -m fedtransfer.cli deploy superlink ...`): what
# it starts (flower-superlink, flower-supernode) is a grandchild, out of the runtime guard's sight
PROCESS_COMMAND = "fedtransfer.cli"
# executables the runtime guard refuses in the fast lane
FLOWER_OR_RAY = ("flwr", "flower-", "ray", "raylet", "gcs_server")
_WALKED_MODULES = ("tests.", "benchmarks.", "conftest")


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    """A function's code and that of the functions, lambdas and comprehensions defined in it."""
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _strings(consts: tuple[Any, ...]) -> Iterator[str]:
    """The string constants of code, also those inside the tuples a literal list of constants is folded into."""
    for const in consts:
        if isinstance(const, str):
            yield const
        elif isinstance(const, tuple | frozenset):
            yield from _strings(tuple(const))


def _callables_of(obj: Any) -> list[Any]:
    """The functions to read for `obj`: itself, or a class's methods; wrapped ones (contextmanager) unwrapped."""
    if inspect.isclass(obj):
        return [inspect.unwrap(v) for v in vars(obj).values() if inspect.isfunction(inspect.unwrap(v))]
    obj = inspect.unwrap(obj) if callable(obj) else obj
    return [obj] if inspect.isfunction(obj) else []


def _is_starter(obj: Any) -> bool:
    named = (getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)) in NAMED_STARTERS
    return named or any(obj is starter for starter in STARTERS)


def _starting_command(consts: set[str]) -> bool:
    """Whether string constants beside a `main(...)` call name a command that starts Flower (not a --dry-run)."""
    deploys = "deploy" in consts and bool(consts & DEPLOY_COMMANDS)
    return ("simulate" in consts or deploys) and "--dry-run" not in consts


def _named(namespace: dict[str, Any], names: set[str]) -> Iterator[Any]:
    """The objects the code's global names stand for; for a module, each attribute name the code uses on it."""
    for name in names:
        obj = namespace.get(name, sys.modules.get(name))  # a dotted name: a module imported inside the function
        if isinstance(obj, types.ModuleType):
            yield from (getattr(obj, attr) for attr in names if hasattr(obj, attr))
        elif obj is not None:
            yield obj


def _is_benchmark(name: str) -> bool:
    """A benchmark a test runs whole, `python -m benchmarks.<name>`: its own process, minutes even at smoke size."""
    try:
        spec = importlib.util.find_spec(name)
    except ImportError:
        return False
    return spec is not None and str(spec.origin).endswith(".py")  # a module, not a folder such as benchmarks.results


def _reaches_a_starter(func: Any, seen: set[int]) -> bool:
    """True when `func`, or a tests/benchmarks helper it names, names a starter."""
    if id(func) in seen:
        return False
    seen.add(id(func))
    for code in _code_objects(func.__code__):
        consts = set(_strings(code.co_consts))
        if any(_is_benchmark(name) for name in consts if name.startswith("benchmarks.")):
            return True
        if PROCESS_COMMAND in consts and _starting_command(consts):  # `python -m fedtransfer.cli deploy ...`
            return True
        for target in _named(getattr(func, "__globals__", {}), set(code.co_names)):
            if _is_starter(target) or (target is cli_main.main and _starting_command(consts)):
                return True
            helper = getattr(target, "__module__", None) or ""
            if helper.startswith(_WALKED_MODULES) and any(_reaches_a_starter(f, seen) for f in _callables_of(target)):
                return True
    return False


def starts_processes(item: pytest.Function) -> bool:
    """Whether the test, or one of its fixtures, reaches a process starter."""
    seen: set[int] = set()
    functions = [item.function]
    for defs in item._fixtureinfo.name2fixturedefs.values():
        functions += [inspect.unwrap(d.func) for d in defs]
    return any(_reaches_a_starter(f, seen) for f in functions if inspect.isfunction(f))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if not isinstance(item, pytest.Function) or item.get_closest_marker("slow"):
            continue
        if not item.get_closest_marker("refused_before_flower") and starts_processes(item):
            item.add_marker(pytest.mark.slow)


def _fast_lane(config: pytest.Config) -> bool:
    """A run that leaves the slow tests out (`-m "not slow"`): there, no test may start Flower or Ray."""
    return "not slow" in (config.getoption("markexpr") or "")


def _flower_or_ray(args: Any) -> str | None:
    """The program's name when it is this environment's Flower or Ray executable (not a test's stand-in)."""
    argv = [args] if isinstance(args, str | os.PathLike) else list(args)
    if not argv:
        return None
    program = Path(shutil.which(str(argv[0])) or str(argv[0]))
    name = program.name
    return name if name.startswith(FLOWER_OR_RAY) and program.parent == BIN_DIR else None


@pytest.fixture(autouse=True)
def _no_flower_in_the_fast_lane(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail a fast-lane test that starts a Flower or Ray executable: the marking above missed what it uses."""
    if not _fast_lane(request.config) or request.node.get_closest_marker("slow"):
        return
    original = subprocess.Popen.__init__

    def guarded(self: subprocess.Popen, args: Any, *rest: Any, **kwargs: Any) -> None:
        program = _flower_or_ray(args)
        if program is not None:
            pytest.fail(
                f"{request.node.nodeid} starts {program} but is not marked slow: add what it uses to STARTERS "
                "in tests/conftest.py",
                pytrace=False,
            )
        original(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.fixture(autouse=True)
def _umask_left_as_it_was(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves the process umask changed, after restoring it for the tests after it.

    The ClientApp and ServerApp tighten the umask for the rest of their process (their files are
    the operator's alone); a test that calls them in its own process and keeps that umask makes
    every later test in the worker write owner-only files, and tests that read modes fail far away.
    """
    before = _current_umask()
    yield
    after = _current_umask()
    if after != before:
        os.umask(before)
        pytest.fail(
            f"{request.node.nodeid} left the process umask at {after:03o} (it was {before:03o}): restore it "
            "(the `app_process_umask` fixture of tests/conftest.py, for a test that calls an app in-process)",
            pytrace=False,
        )


@pytest.fixture
def app_process_umask() -> Iterator[None]:
    """This test stands in for a ClientApp or ServerApp process, whose umask stays owner-only once it answers.

    Flower's app process ends there; the test's worker process goes on, so its umask is given back.
    """
    previous = _current_umask()
    yield
    os.umask(previous)


def pytest_configure(config: pytest.Config) -> None:
    """One torch thread per xdist worker: two workers on two cores, each with torch's default of one intra-op
    thread per core, spent half their CPU spinning on each other (the fast lane took 3 min 46 s and 464 s of CPU;
    with this, 2 min 20 s and 242 s). Only torch's own pool: NumPy's BLAS keeps its threads, and with them the
    shipped configs' PRV ε to the last digit (OMP_NUM_THREADS=1 moves it by one ulp). Processes a test starts
    keep their defaults."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
