"""Experiment tracking: each run mirrored into MLflow, where hospital and bank ML teams compare runs.

The run folder stays the record (metrics.jsonl, privacy.json, model.pt, the audit logs); MLflow
gets a copy as the run goes: the config as params when the first round ends, every round's
metrics with the round as the step, and at the end the plots, model.pt, the metrics and
privacy files and an audit report if one is there, as artifacts. With `tracking.uri` "" the
store is a SQLite file in the run's own folder (nothing to start); a team gives its server's URI.

A resumed run continues the MLflow run tagged with the same fedtransfer run id. A store that
fails (a server down, a locked database) is one warning, and that run is not tracked any
further: a federation of hospitals does not stop, or wait every round, because a dashboard is
unreachable.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from logging import WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtransfer.common.config.run import RunConfig, to_run_config
from flwr.common.logger import log

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

RUN_TAG = "fedtransfer.run_id"  # finds a resumed run's MLflow run
LOCAL_STORE, LOCAL_ARTIFACTS = "mlflow.db", "mlartifacts"  # in output_dir when tracking.uri is ""
ARTIFACTS = (
    "accuracy.png",
    "epsilon.png",
    "model.pt",
    "metrics.jsonl",
    "privacy.json",
    "config.json",
    "status.json",
    "audit-report.html",
    "audit-report.json",
)
PER_SITE = ("epsilon", "accuracy", "train_s", "bytes_sent")  # logged as "<key>/<site>" when a site reports them
BATCH = 100  # MLflow takes at most 100 params (1,000 metrics) per log_batch call
_NOT_PARAMS = ("resume",)  # differs between a run and its resumption; MLflow params cannot change

Session = tuple["MlflowClient", str]  # the client and the MLflow run id
_sessions: dict[str, Session | None] = {}  # fedtransfer run id -> open session; None: the store failed, gave up


def store_uri(cfg: RunConfig) -> str:
    """Where the run is tracked: the configured URI, or a SQLite file in the run's folder."""
    return cfg.tracking.uri or f"sqlite:///{cfg.output_path / LOCAL_STORE}"


def round_metrics(line: dict[str, Any]) -> dict[str, float]:
    """One metrics.jsonl line as MLflow metrics, under names that stay the same from run to run."""
    server, federated = line["server"], line.get("federated") or {}
    out = {
        "server_accuracy": server.get("accuracy"),
        "server_loss": server.get("loss"),
        "federated_accuracy": federated.get("accuracy"),
        "federated_loss": federated.get("loss"),
        "sites_trained": line.get("sites_trained"),
        "bytes_received": line.get("bytes_received"),
        "bytes_sent_per_site": line.get("bytes_sent_per_site"),
        "round_time_s": line.get("time_s"),
    }
    out |= {f"{key}/{site}": rec.get(key) for site, rec in line.get("sites", {}).items() for key in PER_SITE}
    return {k: float(v) for k, v in out.items() if _is_number(v)}


def round_done(cfg: RunConfig, run_id: str, line: dict[str, Any]) -> None:
    """Log one round's metrics (the round is the step); nothing when tracking is off."""

    def log_round(client: MlflowClient, run: str) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, line["round"]) for k, v in sorted(round_metrics(line).items())]
        for start in range(0, len(metrics), BATCH):
            client.log_batch(run, metrics=metrics[start : start + BATCH])

    if cfg.tracking.enabled:
        _with_session(cfg, run_id, f"round {line['round']}", log_round)


def finished(cfg: RunConfig, run_id: str, run_dir: Path, summary: dict[str, Any]) -> None:
    """Log the run's files as artifacts and close the MLflow run as FINISHED or FAILED."""

    def log_end(client: MlflowClient, run: str) -> None:
        for name in ARTIFACTS:
            if (run_dir / name).is_file():
                client.log_artifact(run, str(run_dir / name))
        if _is_number(summary.get("final_accuracy")):
            client.log_metric(run, "final_accuracy", float(summary["final_accuracy"]))
        client.set_terminated(run, "FINISHED" if summary.get("status") == "completed" else "FAILED")

    if cfg.tracking.enabled:
        _with_session(cfg, run_id, "the run's end", log_end)
        _sessions.pop(run_id, None)


def _with_session(cfg: RunConfig, run_id: str, what: str, action: Callable[[MlflowClient, str], None]) -> None:
    """Run `action` on the run's MLflow session; the first failure is a warning and ends tracking of the run."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    if run_id in _sessions and _sessions[run_id] is None:
        return
    try:
        session = _sessions[run_id] = _sessions.get(run_id) or _open(cfg, run_id)
        action(*session)
    except (MlflowException, SQLAlchemyError, OSError) as err:  # requests' errors are OSErrors
        _sessions[run_id] = None
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        log(
            WARNING,
            "tracking: %s of run %s not logged to %s (%s); tracking of this run stops, its files in %s are complete",
            what,
            run_id,
            store_uri(cfg),
            reason,
            cfg.output_path,
        )


def _open(cfg: RunConfig, run_id: str) -> Session:
    """The MLflow run of this fedtransfer run: found by its tag (a resumed run), or created with the config."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        local = None if cfg.tracking.uri else (cfg.output_path / LOCAL_ARTIFACTS).as_uri()
        experiment_id = client.create_experiment(cfg.tracking.experiment, artifact_location=local)
    found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_id}'", max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return client, found[0].info.run_id
    run = client.create_run(experiment_id, run_name=cfg.run_name, tags={RUN_TAG: run_id})
    params = [Param(k, str(v)) for k, v in sorted(to_run_config(cfg).items()) if k not in _NOT_PARAMS]
    for start in range(0, len(params), BATCH):
        client.log_batch(run.info.run_id, params=params[start : start + BATCH])
    return client, run.info.run_id


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
