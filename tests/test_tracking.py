"""MLflow tracking: a run written by the real RunRecorder (no Flower), read back through MLflow's own client."""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fedtransfer.common.config.run import ConfigError, RunConfig, config_from_dict
from fedtransfer.common.wire.protocol import SiteStatus
from fedtransfer.server.federation import tracking
from fedtransfer.server.federation.recorder import RoundReport, RunRecorder
from fedtransfer.server.federation.rounds import TrainRound
from fedtransfer.server.federation.sites import SiteRound
from flwr.app import ArrayRecord
from mlflow.tracking import MlflowClient

RUN_ID = "0123abcd4567"
HEAD = {"head.1.weight": np.zeros((3, 4), np.float32), "head.1.bias": np.zeros(3, np.float32)}


def _cfg(tmp_path: Path, rounds: int = 3, **tracking_keys: object) -> RunConfig:
    return config_from_dict(
        {
            "output_dir": str(tmp_path / "run"),
            "train": {"rounds": rounds},
            "tracking": {"enabled": True} | tracking_keys,
        }
    )


def _round(rnd: int) -> RoundReport:
    """Round `rnd`: site-0 trains (ε grows), site-1 declines, federated evaluation answered."""
    trained = SiteRound(
        SiteStatus.TRAINED,
        fields={"num_examples": 100, "steps": 10, "epsilon": 0.5 * rnd, "bytes_sent": 51_496, "train_s": 0.25},
    )
    declined = SiteRound(SiteStatus.DECLINED, "site policy: budget used up")
    train = TrainRound(sites={"site-0": trained, "site-1": declined}, arrays=ArrayRecord(), bytes_received=51_496)
    return RoundReport(
        rnd,
        train,
        {},
        HEAD,
        {},
        {"accuracy": 0.5 + 0.1 * rnd, "loss": 1.0 / rnd},
        {"accuracy": 0.4 + 0.1 * rnd, "loss": 2.0 / rnd},
        1.5,
        51_496,
    )


def _run(cfg: RunConfig, rounds: range, resumed: bool = False) -> RunRecorder:
    cfg.output_path.mkdir(parents=True, exist_ok=True)
    recorder = RunRecorder(cfg, RUN_ID, {})
    recorder.started(rounds.start, resumed, {"backbone": "mobilenet_v2", "fingerprint": "f" * 12}, sorted(HEAD))
    for rnd in rounds:
        recorder.round_done(_round(rnd))
    (cfg.output_path / "model.pt").write_bytes(b"a model file")
    recorder.finish(HEAD, 0.8, cfg.output_path / "model.pt", None)
    return recorder


def _mlflow_runs(cfg: RunConfig) -> tuple[MlflowClient, list]:
    client = MlflowClient(tracking_uri=tracking.store_uri(cfg))
    experiment = client.get_experiment_by_name("fedtransfer")
    assert experiment is not None
    return client, client.search_runs([experiment.experiment_id])


def test_a_run_is_read_back_through_mlflow(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    _run(cfg, range(1, 4))
    client, runs = _mlflow_runs(cfg)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "demo"
    assert run.data.tags[tracking.RUN_TAG] == RUN_ID
    assert run.data.params["train.rounds"] == "3" and run.data.params["privacy.target_epsilon"] == "3.0"
    assert run.data.params["tracking.enabled"] == "True" and "resume" not in run.data.params
    mlflow_id = run.info.run_id
    server = client.get_metric_history(mlflow_id, "server_accuracy")
    assert [(m.step, round(m.value, 6)) for m in server] == [(1, 0.6), (2, 0.7), (3, 0.8)]
    assert [m.value for m in client.get_metric_history(mlflow_id, "epsilon/site-0")] == [0.5, 1.0, 1.5]
    assert [m.step for m in client.get_metric_history(mlflow_id, "federated_accuracy")] == [1, 2, 3]
    for name in ("round_time_s", "bytes_received", "bytes_sent_per_site", "train_s/site-0", "server_loss"):
        assert len(client.get_metric_history(mlflow_id, name)) == 3, name
    assert "epsilon/site-1" not in run.data.metrics  # it declined every round: no ε to report
    assert run.data.metrics["final_accuracy"] == 0.8
    artifacts = {a.path for a in client.list_artifacts(mlflow_id)}
    assert {"accuracy.png", "epsilon.png", "model.pt", "metrics.jsonl", "privacy.json", "status.json"} <= artifacts
    local = Path(client.download_artifacts(mlflow_id, "model.pt", str(tmp_path)))
    assert local.read_bytes() == b"a model file"
    assert (cfg.output_path / tracking.LOCAL_STORE).is_file()  # the local store lives in the run's own folder


def test_a_resumed_run_continues_its_mlflow_run(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    cfg.output_path.mkdir(parents=True)
    recorder = RunRecorder(cfg, RUN_ID, {})
    recorder.round_done(_round(1))  # the coordinator crashed after round 1
    _run(replace(cfg, resume=True), range(2, 4), resumed=True)
    client, runs = _mlflow_runs(cfg)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "server_accuracy")] == [1, 2, 3]


def test_a_failed_run_is_marked_failed(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, rounds=1)
    cfg.output_path.mkdir(parents=True)
    recorder = RunRecorder(cfg, RUN_ID, {})
    recorder.round_done(_round(1))
    recorder.finish(HEAD, 0.6, None, "no site's update was ever aggregated")
    _, runs = _mlflow_runs(cfg)
    assert runs[0].info.status == "FAILED"


def test_tracking_off_writes_no_store(tmp_path: Path) -> None:
    cfg = config_from_dict({"output_dir": str(tmp_path / "run"), "train": {"rounds": 1}})
    assert not cfg.tracking.enabled
    _run(cfg, range(1, 2))
    assert not (cfg.output_path / tracking.LOCAL_STORE).exists()
    assert not (cfg.output_path / tracking.LOCAL_ARTIFACTS).exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_server_is_one_warning_and_the_run_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = _cfg(tmp_path, uri=f"http://127.0.0.1:{_closed_port()}")
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _run(cfg, range(1, 4))
    assert time.monotonic() - started < 60
    warnings = [r.getMessage() for r in caplog.records if "tracking:" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "round 1" in warnings[0] and "127.0.0.1" in warnings[0] and "tracking of this run stops" in warnings[0]
    assert (cfg.output_path / "status.json").read_text().count('"completed"') == 1
    assert len((cfg.output_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_round_metrics_keeps_finite_numbers_only() -> None:
    line = {
        "round": 2,
        "time_s": 1.0,
        "server": {"accuracy": float("nan"), "loss": 0.5},
        "federated": None,
        "sites": {"a": {"status": "trained", "epsilon": 1.2, "accuracy": 0.9}, "b": {"status": "declined"}},
        "sites_trained": 1,
        "aggregated": True,
        "bytes_received": 10,
        "bytes_sent_per_site": 5,
    }
    assert tracking.round_metrics(line) == {
        "server_loss": 0.5,
        "sites_trained": 1.0,
        "bytes_received": 10.0,
        "bytes_sent_per_site": 5.0,
        "round_time_s": 1.0,
        "epsilon/a": 1.2,
        "accuracy/a": 0.9,
    }


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "http://mlflow:5000",
        "https://mlflow.example.org",
        "sqlite:////srv/mlflow.db",
        "postgresql+psycopg2://u@db/mlflow",
        "databricks",
    ],
)
def test_tracking_uris_accepted(uri: str) -> None:
    assert config_from_dict({"tracking": {"uri": uri}}).tracking.uri == uri


@pytest.mark.parametrize(
    ("tracking_keys", "key"),
    [
        ({"uri": "./mlruns"}, "tracking.uri"),
        ({"uri": "ftp://host/x"}, "tracking.uri"),
        ({"experiment": ""}, "tracking.experiment"),
        ({"enabled": "yes"}, "tracking.enabled"),
        ({"server": "x"}, "tracking.server"),
    ],
)
def test_bad_tracking_config_names_the_key(tracking_keys: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict({"tracking": tracking_keys})
    assert str(err.value).startswith(f"{key}:") and "\n" not in str(err.value)
