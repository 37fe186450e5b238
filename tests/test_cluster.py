"""`fedtransfer simulate --ray-address`: a simulation on an existing two-node Ray cluster on loopback.

The head (127.0.0.2) offers no CPU, so every site's ClientApp actor must run on the worker
node (127.0.0.3): a completed run whose actors logged on the worker node ran on the
cluster. The worker runs in a mount namespace with an empty tmpfs over one folder, a node
that does not share that storage: a run whose output_dir is there is refused in one line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fedtransfer.cli.main import main
from fedtransfer.common.config.run import config_from_dict
from fedtransfer.server.launch.simulation import simulate

from tests.ray_cluster import RAY_ENV, can_hide_folders, two_node_cluster

TINY = {
    "run_name": "cluster",
    "backbone": {"image_size": 32},
    "data": {"num_sites": 2, "max_samples": 400, "split": "iid"},
    "train": {"rounds": 1, "local_epochs": 2, "protocol": "fedavg", "learning_rate": 0.5},
    "privacy": {"target_epsilon": 3.0, "target_delta": 1.0e-4, "feature_stats": False, "accountant": "rdp"},
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """(head address, the Ray folder, a folder the worker node does not see)."""
    if not can_hide_folders():
        pytest.skip("needs unshare --mount (root) to give the worker node storage of its own")
    root = tmp_path_factory.mktemp("ray")
    hidden = tmp_path_factory.mktemp("not-shared")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in RAY_ENV.items():
            mp.setenv(key, value)
        with two_node_cluster(root, worker_cpus=2, hide=hidden) as address:
            yield address, root, hidden


def test_simulation_runs_its_sites_on_the_worker_node(cluster: tuple[str, Path, Path], tmp_path: Path) -> None:
    address, root, _ = cluster
    cfg = config_from_dict(TINY | {"output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache")})
    status = simulate(cfg, stream=False, ray_address=address)
    assert status["status"] == "completed"
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [0, 1]  # round 0: the sites' DP record counts (no feature statistics)
    assert all(m["sites_trained"] == 2 for m in lines)
    assert sorted(p.name for p in (tmp_path / "run" / "sites").iterdir()) == ["site-0", "site-1"]
    # Ray writes the actor's class into its worker's log: the sites were played on the worker node
    logs = [p for p in (root / "worker").rglob("worker-*.out") if "ClientAppActor" in p.read_text(errors="replace")]
    assert logs, f"no ClientAppActor ran on the worker node; see {root}"
    assert not [p for p in (root / "head").rglob("worker-*.out") if "ClientAppActor" in p.read_text(errors="replace")]


def test_storage_a_node_does_not_see_is_one_line_before_flower_starts(
    cluster: tuple[str, Path, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    address, _, hidden = cluster
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(TINY | {"output_dir": str(hidden / "run"), "cache_dir": str(tmp_path / "cache")}))
    assert main(["simulate", "--config", str(config), "--ray-address", address, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"output_dir: {hidden / 'run'} is not shared with Ray node 127.0.0.3" in err
    assert "storage every node mounts at the same path" in err
    assert not (hidden / "run" / "superlink.log").exists()  # refused before any Flower process


def test_an_address_without_a_cluster_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(TINY | {"output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache")}))
    assert main(["simulate", "--config", str(config), "--ray-address", "127.0.0.1:9", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no Ray cluster answers at 127.0.0.1:9" in err
