"""The fast lane's boundary: what tests/conftest.py marks slow, read from code, and what it leaves fast.

The functions below are never run: the marking reads their code, as it reads every test's at collection.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fedtransfer.cli.main import main
from fedtransfer.server.launch import simulation

from tests import conftest
from tests.deploy_harness import local_deployment, write_npz_site


def _simulates_in_a_helper(cfg: object) -> None:
    simulation.simulate(cfg)  # type: ignore[arg-type]


def _test_through_a_helper() -> None:
    _simulates_in_a_helper(None)


def _test_in_a_deployment(tmp_path: Path) -> None:
    with local_deployment(tmp_path, {}):
        pass


def _test_simulate_command(tmp_path: Path) -> None:
    from fedtransfer.cli.main import main as imported_inside

    assert imported_inside(["simulate", "--config", str(tmp_path)]) == 0


def _test_deploy_site_command(tmp_path: Path) -> None:
    assert main(["deploy", "site", "--config", str(tmp_path)]) == 0


def _test_dry_run(tmp_path: Path) -> None:
    assert main(["deploy", "superlink", "--dry-run"]) == 0


def _test_audit_command(tmp_path: Path) -> None:
    assert main(["audit", str(tmp_path / "run")]) == 0


def _test_harness_file_helper(tmp_path: Path) -> None:
    write_npz_site(tmp_path, "site", None)  # type: ignore[arg-type]


def _test_flower_benchmark() -> None:
    run = ["python", "-m", "benchmarks.scale"]
    assert run


def _test_in_process_benchmark() -> None:
    run = ["python", "-m", "benchmarks.accuracy"]
    assert run


def _test_a_string_that_names_no_benchmark() -> None:
    assert "benchmarks.results".startswith("benchmarks.")


# named through tuples, which the marking does not follow: these tests themselves stay in the fast lane
STARTING = (_test_through_a_helper, _test_in_a_deployment, _test_simulate_command, _test_deploy_site_command)
NOT_STARTING = (_test_dry_run, _test_audit_command, _test_harness_file_helper, _test_a_string_that_names_no_benchmark)
BENCHMARK_RUNS = (_test_flower_benchmark, _test_in_process_benchmark)


def _marked(func: object) -> bool:
    return conftest._reaches_a_starter(func, set())


def test_what_starts_flower_is_found_through_helpers_imports_and_commands() -> None:
    for func in STARTING:
        assert _marked(func), func.__name__


def test_what_starts_nothing_stays_in_the_fast_lane() -> None:
    for func in NOT_STARTING:
        assert not _marked(func), func.__name__


def test_a_benchmark_run_whole_as_a_process_is_slow() -> None:
    """Flower inside (scale) or minutes of training (accuracy): either way its own process, not the fast lane."""
    for func in BENCHMARK_RUNS:
        assert _marked(func), func.__name__


def _flowers_run_simulation() -> None:
    """Stands in for `flwr.simulation.run_simulation`: the marking knows Flower's starters by name, unimported."""


_flowers_run_simulation.__module__, _flowers_run_simulation.__qualname__ = (
    "flwr.simulation.run_simulation",
    "run_simulation",
)


def _test_flowers_simulation_engine() -> None:
    _flowers_run_simulation()


FLOWER_STARTING = (_test_flowers_simulation_engine,)  # a tuple, as above: this test itself stays fast


def test_flowers_own_simulation_is_slow_without_importing_ray() -> None:
    """conftest names Flower's starters rather than importing `flwr.simulation` (Ray) into every worker."""
    for func in FLOWER_STARTING:
        assert _marked(func), func.__name__
    assert "flwr" not in vars(conftest), "conftest imports Flower (and with flwr.simulation, Ray) again"


def test_these_tests_stay_in_the_fast_lane(request: pytest.FixtureRequest) -> None:
    assert not conftest.starts_processes(request.node)


def test_the_guard_knows_this_environments_flower_from_a_stand_in(tmp_path: Path) -> None:
    """The fast lane refuses the environment's own flwr/ray, never a test's fake `flwr` script."""
    assert conftest._flower_or_ray([str(conftest.BIN_DIR / "flower-superlink"), "--insecure"]) == "flower-superlink"
    assert conftest._flower_or_ray([str(conftest.BIN_DIR / "ray"), "start"]) == "ray"
    assert conftest._flower_or_ray([str(tmp_path / "flwr"), "run"]) is None
    assert conftest._flower_or_ray(["git", "status"]) is None
