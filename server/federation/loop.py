"""The coordinator's round loop: ask the sites, aggregate what passed screening, evaluate, record.

Flower's `Strategy.start` runs a fixed loop; ours calls the same strategy methods (through
`ScreenedStrategy`) and adds what a privacy-preserving federation needs between them:
naming what every site did each round, per-site ε, atomic checkpoints, resuming, and a
verdict: a run whose rounds did not all aggregate at least `train.min_sites` sites FAILED,
exports no model and says why.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from fedtransfer.common.config.run import RunConfig, to_nested
from fedtransfer.common.model.finetune import trains
from fedtransfer.common.model.threshold import Threshold
from fedtransfer.common.privacy.counts import round_zero_release
from fedtransfer.common.storage import atomic, locking
from fedtransfer.common.wire.exchange import wire_bytes
from fedtransfer.common.wire.protocol import Cfg
from fedtransfer.server.export.model_file import export_model
from fedtransfer.server.federation import checkpoint, class_counts, report, run_folder
from fedtransfer.server.federation.console import final_evaluation_summary, log_round
from fedtransfer.server.federation.coordinator import Coordinator, as_numpy, set_up
from fedtransfer.server.federation.evaluation import EvaluateRound, Sampled, carried_model, evaluate_round, read, sample
from fedtransfer.server.federation.recorder import RoundReport, RunRecorder
from fedtransfer.server.federation.rounds import TrainRound, plain_round, secure_train_round
from fedtransfer.server.federation.sites import SiteBook, absent_sites
from fedtransfer.server.federation.strategy import ScreenedStrategy
from flwr.app import ArrayRecord, ConfigRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

APP_VERSION = "0.1.0"


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    run_id: str
    final_accuracy: float
    model_path: Path | None
    status: str  # "completed" or "failed"
    reason: str | None = None


def run_federation(grid: Grid, cfg: RunConfig, resume: bool = False) -> RunResult:
    """Run (or resume) the configured federation in its output folder, held for the run's life."""
    run_dir = cfg.output_path
    with locking.hold(run_dir, f"fedtransfer run into {run_dir}"):
        if resume and (done := run_folder.check_resume(cfg)) is not None:
            log(INFO, "Run %s in %s already completed: nothing to resume", done.get("run_id"), run_dir)
            return RunResult(
                run_dir,
                str(done.get("run_id")),
                float(done.get("final_accuracy") or "nan"),
                Path(done["model"]) if done.get("model") else None,
                "completed",
            )
        return _run(grid, cfg, resume)


def _run(grid: Grid, cfg: RunConfig, resume: bool) -> RunResult:
    run_dir = cfg.output_path
    co, head = set_up(cfg)
    ckpt = checkpoint.latest(run_dir) if resume else None
    if ckpt is None:
        if resume:
            log(WARNING, "No checkpoint in %s: starting from round 1", run_dir)
        run_id, start, sites = uuid.uuid4().hex[:12], 1, {}
        atomic.write_text(run_dir / run_folder.CONFIG, json.dumps(to_nested(cfg), indent=2))
    else:
        run_id, start, sites, head = ckpt.run_id, ckpt.server_round + 1, ckpt.sites, ckpt.head
        co.strategy.restore(ckpt.strategy_state)
        report.truncate_metrics(run_dir, ckpt.server_round)
        log(INFO, "Resuming run %s from round %d checkpoint in %s", run_id, ckpt.server_round, run_dir)
    (run_dir / run_folder.STATUS).unlink(missing_ok=True)  # this run's verdict is written when it ends
    recorder = RunRecorder(cfg, run_id, sites)
    recorder.started(
        start,
        ckpt is not None,
        {"backbone": co.encoder.name, "fingerprint": co.encoder.fingerprint, "trains": trains(cfg.finetune)},
        sorted(head),
    )
    log(
        INFO,
        "Run %s: %s (%s), %d classes, %d rounds, sites' DP target ε = %s, output %s",
        run_id,
        co.encoder.name,
        co.encoder.fingerprint[:12],
        len(co.classes),
        cfg.train.rounds,
        cfg.privacy.target_epsilon if cfg.privacy.enabled else "off (no DP)",
        run_dir,
    )
    config = {Cfg.RUN_ID: run_id, Cfg.FINGERPRINT: co.encoder.fingerprint, Cfg.APP_VERSION: APP_VERSION}
    if cfg.train.strategy == "fedprox":
        config[Cfg.PROXIMAL_MU] = cfg.train.proximal_mu
    book, accuracy = SiteBook(sites), float("nan")
    kind = round_zero_release(cfg.privacy)
    if co.release is not None and kind is not None and start == 1 and ckpt is None:  # round 0, before training
        head, accuracy = _round(
            grid,
            0,
            head,
            config=ConfigRecord({**config, Cfg.RELEASE: kind}),
            co=co,
            book=book,
            recorder=recorder,
        )
    for rnd in range(start, cfg.train.rounds + 1):
        head, accuracy = _round(grid, rnd, head, config=ConfigRecord(config), co=co, book=book, recorder=recorder)
    if start > cfg.train.rounds:  # resumed after the last round's checkpoint (in the final evaluation)
        accuracy = float(co.evaluate(head)["accuracy"] or "nan")
    _final_evaluation(grid, head, config=ConfigRecord(config), co=co, book=book, recorder=recorder)
    return _finish(co, recorder, head, accuracy)


@contextmanager
def _flower_sampling_seed(seed: str) -> Iterator[None]:
    """Flower samples nodes with `random`: seed it for the round, then give the process its state back."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def _round(
    grid: Grid,
    rnd: int,
    head: dict[str, np.ndarray],
    *,
    config: ConfigRecord,
    co: Coordinator,
    book: SiteBook,
    recorder: RunRecorder,
) -> tuple[dict[str, np.ndarray], float]:
    cfg, t0 = co.cfg, time.monotonic()
    arrays = ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in head.items()})
    connected = book.learn_registered(grid)
    release = co.release if rnd == 0 else None  # round 0 is the statistics release: every site once
    sampled = None
    if (model := carried_model(cfg, rnd)) is not None:  # the head sent is model `model`: its sites score it first
        with _flower_sampling_seed(f"{cfg.seed}|{recorder.run_id}|{model}|evaluate"):
            sampled = sample(co.strategy, model, arrays, config=config, grid=grid)
    with _flower_sampling_seed(f"{cfg.seed}|{recorder.run_id}|{rnd}"):
        train = _exchange(grid, rnd, arrays, config=config, co=co, book=book, release=release, sampled=sampled)
    if train.arrays is not None:
        head = co.start_from(head, train.arrays) if release is not None else as_numpy(train.arrays)
        arrays = ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in head.items()})
    absent = absent_sites(book, train.sites, [book.name(n) for n in connected])
    evaluated = (
        EvaluateRound()
        if sampled is None
        else read(sampled.model_round, train.evaluations, len(co.classes), summed=train.summed_evaluation)
    )
    outcome = RoundReport(
        rnd,
        train,
        absent,
        head,
        co.strategy.state(),
        co.evaluate(head),
        evaluated.metrics,
        time.monotonic() - t0,
        wire_bytes(arrays),
        evaluated.sites,
        scored_round=None if sampled is None else sampled.model_round,
    )
    line = recorder.round_done(outcome)
    log_round(rnd, cfg, line, len(train.sites), scored=(outcome.scored_round, evaluated.metrics))
    return head, outcome.server["accuracy"]


def _exchange(
    grid: Grid,
    rnd: int,
    arrays: ArrayRecord,
    *,
    config: ConfigRecord,
    co: Coordinator,
    book: SiteBook,
    release: ScreenedStrategy | None,
    sampled: Sampled | None,
) -> TrainRound:
    """Round `rnd`'s one exchange with the sites, plain or SecAgg+ (round 0's release too: the server then holds
    only its sum); the evaluation of the model sent (`sampled`) rides in it."""
    cfg = co.cfg
    if cfg.secure_aggregation:
        return secure_train_round(
            grid,
            rnd,
            arrays,
            config=config,
            strategy=release or co.strategy,
            book=book,
            cfg=cfg,
            sampled=sampled,
            num_classes=len(co.classes),
        )
    return plain_round(
        grid,
        rnd,
        arrays,
        config=config,
        strategy=release or co.strategy,
        book=book,
        timeout=cfg.train.round_timeout_s,
        sampled=sampled,
    )


def _final_evaluation(
    grid: Grid,
    head: dict[str, np.ndarray],
    *,
    config: ConfigRecord,
    co: Coordinator,
    book: SiteBook,
    recorder: RunRecorder,
) -> None:
    """The final model's evaluation: the run's one exchange of evaluation alone (each earlier model was scored
    in the next round's training message). A resumed run repeats it; the sites answer from their reply cache."""
    cfg, rnd = co.cfg, co.cfg.train.rounds
    if not cfg.train.evaluates(rnd):
        return
    arrays = ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in head.items()})
    book.learn_registered(grid)
    with _flower_sampling_seed(f"{cfg.seed}|{recorder.run_id}|{rnd}|evaluate"):
        evaluated = evaluate_round(
            grid,
            rnd,
            arrays,
            config=config,
            strategy=co.strategy,
            book=book,
            timeout=cfg.train.round_timeout_s,
            num_classes=len(co.classes),
        )
    recorder.scored(rnd, evaluated.metrics, evaluated.sites)
    fed = evaluated.metrics
    log(
        INFO,
        "%s",
        final_evaluation_summary(
            rnd,
            cfg.train.rounds,
            sites_accuracy=fed["accuracy"] if fed else None,
            sites_measured=(fed.get("accuracy_interval95"), fed.get("records")) if fed else (None, None),
        ),
    )


def _finish(co: Coordinator, recorder: RunRecorder, head: dict[str, np.ndarray], accuracy: float) -> RunResult:
    """A run succeeds when every round aggregated; only then is the model exported."""
    cfg = co.cfg
    failed = recorder.failed_rounds()
    failure = None
    if failed:
        failure = (
            f"round(s) {failed} did not aggregate updates from at least train.min_sites = "
            f"{cfg.train.min_sites} sites; see the per-site reasons in metrics.jsonl"
        )
    model = None
    threshold = class_counts.threshold_for(cfg, len(co.classes))  # binary runs: stored in model.pt, named in status
    if failure is None:
        model, failure = export_or_why(co, head, threshold)
    summary = recorder.finish(head, accuracy, model, failure, threshold=threshold)
    return RunResult(cfg.output_path, recorder.run_id, accuracy, model, summary["status"], failure)


def export_or_why(
    co: Coordinator, head: dict[str, np.ndarray], threshold: Threshold | None = None
) -> tuple[Path | None, str | None]:
    """model.pt, written atomically; a full or read-only disk is the run's failure, never a torn file."""
    path = co.cfg.output_path / "model.pt"
    try:
        return export_model(
            path,
            co.encoder,
            co.head(head),
            hidden=co.cfg.head.hidden,
            classes=co.classes,
            finetune=co.cfg.finetune,
            threshold=threshold,
        ), None
    except OSError as err:
        return None, f"could not write {path} ({err.strerror or err}); free space, then --resume to export it"
