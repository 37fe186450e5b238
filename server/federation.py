"""The coordinator's round loop: configure, screen replies, aggregate, evaluate, record.

Flower's `Strategy.start` runs a fixed loop; ours calls the same strategy methods but
adds what a privacy-preserving federation needs between them: screening every update,
naming sites that decline and why, per-site ε, atomic checkpoints and resuming.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.logger import log
from flwr.serverapp import Grid

from common import atomic
from common.audit_log import AuditLog, update_digest
from common.backbones import load_backbone, resolve_device
from common.config import RunConfig, to_nested
from common.data import federation_for
from common.exchange import arrays_to_numpy, head_spec, head_to_arrays, wire_bytes
from common.features import cached_features
from common.head import evaluate_head, make_head
from server import checkpoint, report
from server.export import export_model, head_from_arrays
from server.secure import secure_round
from server.strategy import (
    make_strategy,
    restore_strategy_state,
    screen_train_replies,
    site_name,
    site_name_from,
    strategy_state,
)

APP_VERSION = "0.1.0"


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    run_id: str
    final_accuracy: float
    model_path: Path


def run_federation(grid: Grid, cfg: RunConfig, resume: bool = False) -> RunResult:
    run_dir = cfg.output_path
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "status.json").unlink(missing_ok=True)
    atomic.write_text(run_dir / "config.json", json.dumps(to_nested(cfg), indent=2))
    backbone = load_backbone(cfg.backbone, resolve_device(cfg.device))
    fed = federation_for(cfg)
    test_x, _ = cached_features(backbone, fed.server_test, cfg.cache_path)
    test_y = torch.from_numpy(fed.server_test.labels)
    classes = list(fed.server_test.classes)
    torch.manual_seed(cfg.seed)
    head = make_head(backbone.feature_dim, len(classes), cfg.head.hidden)
    spec = head_spec(head)
    strategy = make_strategy(cfg.train)

    ckpt = checkpoint.latest(run_dir) if resume else None
    if ckpt is not None:
        run_id, start, sites = ckpt.run_id, ckpt.server_round + 1, ckpt.sites
        arrays = ArrayRecord({k: torch.from_numpy(v) for k, v in ckpt.head.items()})
        restore_strategy_state(strategy, ckpt.strategy_state)
        report.truncate_metrics(run_dir, ckpt.server_round)
        log(INFO, "Resuming run %s from round %d checkpoint in %s", run_id, ckpt.server_round, run_dir)
    else:
        if resume:
            log(WARNING, "No checkpoint in %s: starting from round 1", run_dir)
        run_id, start, sites = uuid.uuid4().hex[:12], 1, {}
        arrays = head_to_arrays(head)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    log(INFO, "Run %s: %s (%s), %d classes, %d rounds, sites' DP target ε = %s, output %s", run_id, backbone.name,
        backbone.fingerprint[:12], len(classes), cfg.train.rounds,
        cfg.privacy.target_epsilon if cfg.privacy.enabled else "off (no DP)", run_dir)  # fmt: skip

    audit = AuditLog(run_dir / "audit.jsonl")
    audit.append("run-started" if ckpt is None else "run-resumed", run_id=run_id, round=start,
                 backbone=backbone.name, fingerprint=backbone.fingerprint, head=sorted(spec))  # fmt: skip
    names: dict[int, str] = {}
    base = {"run-id": run_id, "backbone-fingerprint": backbone.fingerprint, "app-version": APP_VERSION}
    if cfg.train.strategy == "fedprox":
        base["proximal-mu"] = cfg.train.proximal_mu
    accuracy = float("nan")
    for rnd in range(start, cfg.train.rounds + 1):
        t0 = time.monotonic()
        random.seed(f"{cfg.seed}|{run_id}|{rnd}")  # Flower samples nodes with `random`
        _learn_registered_names(grid, names)
        messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(dict(base)), grid))
        exchange = (_secure_exchange if cfg.secure_aggregation else _plain_exchange)(
            grid, rnd, arrays, base, messages, spec, names, cfg
        )
        round_sites: dict[str, dict[str, Any]] = {}
        for got in exchange.accepted:
            audit.append("update-received", run_id=run_id, round=rnd, site=got.name, update=got.digest,
                         **({"masked": True} if cfg.secure_aggregation else {}))  # fmt: skip
            round_sites[got.name] = _trained_record(rnd, got.metrics)
            if got.bytes_sent is not None:
                round_sites[got.name]["bytes_sent"] = got.bytes_sent
            rec = sites.setdefault(got.name, {"rounds": []})
            rec["rounds"].append(round_sites[got.name])
            rec["accountant"] = got.accountant
            rec["delta"] = got.metrics.get("delta")
        for name, reason in exchange.refused:
            audit.append("update-refused", run_id=run_id, round=rnd, site=name, reason=reason)
            log(WARNING, "round %d: site %s did not contribute: %s", rnd, name, reason)
            round_sites[name] = {"round": rnd, "status": "declined", "reason": reason}
            sites.setdefault(name, {"rounds": []})["rounds"].append(round_sites[name])
        for name, why in exchange.dropped.items():
            log(WARNING, "round %d: site %s did not reply (dropped out): %s", rnd, name, why)
            round_sites[name] = {"round": rnd, "status": "no-reply", "reason": f"dropped out: {why}"}
            sites.setdefault(name, {"rounds": []})["rounds"].append(round_sites[name])
        if exchange.halted:
            log(WARNING, "round %d: %s; global head unchanged", rnd, exchange.halted)
        elif len(exchange.accepted) >= cfg.train.min_sites:
            new_arrays, _ = strategy.aggregate_train(rnd, exchange.to_aggregate)
            if new_arrays is not None:
                arrays = new_arrays
        else:
            log(WARNING, "round %d: only %d site(s) contributed, fewer than train.min_sites = %d; global head "
                "unchanged", rnd, len(exchange.accepted), cfg.train.min_sites)  # fmt: skip

        secure = {"secure_aggregation": {"halted": exchange.halted} | dataclasses.asdict(cfg.secagg)}
        audit.append("round-aggregated", run_id=run_id, round=rnd, sites=sorted(n for n, r in round_sites.items()
                     if r["status"] == "trained"), aggregate=update_digest(_numpy(arrays)),
                     **(secure if cfg.secure_aggregation else {}))  # fmt: skip
        federated = _federated_evaluation(strategy, rnd, arrays, base, grid, cfg, names)
        current = head_from_arrays(_numpy(arrays), backbone.feature_dim, len(classes), cfg.head.hidden)
        loss, accuracy = evaluate_head(current, test_x, test_y)
        checkpoint.save(run_dir, checkpoint.Checkpoint(run_id, rnd, _numpy(arrays), strategy_state(strategy), sites))
        record = {
            "round": rnd,
            "time_s": round(time.monotonic() - t0, 3),
            "server": {"accuracy": accuracy, "loss": loss},
            "federated": federated,
            "sites": {n: {k: v for k, v in r.items() if k != "round"} for n, r in sorted(round_sites.items())},
            "sites_trained": len(exchange.accepted),
            "bytes_received": exchange.bytes_received,  # counted before aggregation: FedMedian consumes arrays
            "bytes_sent_per_site": wire_bytes(arrays),
        }
        report.append_metrics(run_dir, record)
        report.write_privacy(run_dir, run_id, sites)
        _progress(rnd, cfg, record, len(messages))

    metrics = report.read_metrics(run_dir)
    report.write_plots(run_dir, metrics, cfg.privacy.target_epsilon if cfg.privacy.enabled else None)
    final = head_from_arrays(_numpy(arrays), backbone.feature_dim, len(classes), cfg.head.hidden)
    model_path = export_model(run_dir / "model.pt", cfg.backbone, backbone, final, cfg.head.hidden, classes)
    audit.append("model-exported", run_id=run_id, round=cfg.train.rounds, path=str(model_path),
                 head=update_digest(_numpy(arrays)))  # fmt: skip
    result = RunResult(run_dir, run_id, accuracy, model_path)
    summary = {"status": "completed", "run_id": run_id, "final_accuracy": accuracy, "model": str(model_path)}
    atomic.write_text(run_dir / "status.json", json.dumps(summary, indent=2))
    log(INFO, "Run %s finished: server hold-out accuracy %.4f; model exported to %s", run_id, accuracy, model_path)
    return result


@dataclass(frozen=True)
class Accepted:
    """A site's contribution to a round, as the server may know it (a digest, never a plain head in SecAgg+)."""

    name: str
    metrics: dict[str, Any]
    accountant: str
    digest: dict[str, Any]  # of the plain head, or of the masked vectors under secure aggregation
    bytes_sent: int | None = None  # under secure aggregation: every protocol stage, measured at the server


@dataclass
class Exchange:
    """One round's training exchange: who contributed, who refused or vanished, what to aggregate."""

    accepted: list[Accepted]
    refused: list[tuple[str, str]]  # (site, reason)
    dropped: dict[str, str]  # site -> why
    to_aggregate: list[Message]
    bytes_received: int
    halted: str | None = None  # why secure aggregation produced no mean this round


def _plain_exchange(
    grid: Grid, rnd: int, arrays: ArrayRecord, base: dict, messages: list[Message], spec: dict,
    names: dict[int, str], cfg: RunConfig,
) -> Exchange:  # fmt: skip
    """Every site's head reaches the server; each is screened before Flower's strategy sees it."""
    replies, gone = _split_replies(messages, grid.send_and_receive(messages, timeout=cfg.train.round_timeout_s))
    screened = screen_train_replies(replies, spec, names, cfg.train.max_update_norm, _numpy(arrays))
    accepted = []
    for reply in screened.accepted:
        head = next(iter(reply.content.array_records.values()))
        accountant = str(reply.content["site"]["accountant"]) if "site" in reply.content else "none"
        metrics = dict(next(iter(reply.content.metric_records.values())))
        accepted.append(Accepted(site_name(reply, names), metrics, accountant, update_digest(arrays_to_numpy(head))))
    received = sum(wire_bytes(next(iter(r.content.array_records.values()))) for r in screened.accepted)
    refused = [(name, reason) for _, name, reason in screened.refused]
    return Exchange(accepted, refused, _no_reply(messages, replies, gone, names, cfg), screened.accepted, received)


def _secure_exchange(
    grid: Grid, rnd: int, arrays: ArrayRecord, base: dict, messages: list[Message], spec: dict,
    names: dict[int, str], cfg: RunConfig,
) -> Exchange:  # fmt: skip
    """SecAgg+: the server receives masked vectors and reconstructs only their weighted mean."""
    nodes = [m.metadata.dst_node_id for m in messages]
    out = secure_round(grid, rnd, arrays, ConfigRecord(dict(base)), nodes, cfg.secagg, cfg.train.round_timeout_s)
    accepted = []
    for node, reply in sorted(out.trained.items()):
        metrics = dict(reply.content.metric_records.get("metrics", {}))
        metrics.setdefault("num-examples", 0)
        metrics.setdefault("steps", 0)
        accountant = str(reply.content["site"]["accountant"]) if "site" in reply.content else "none"
        digest = update_digest(out.masked[node]) if node in out.masked else {"sha256": "", "tensors": []}
        accepted.append(Accepted(site_name(reply, names), metrics, accountant, digest, out.payload.get(node, 0)))
    refused, dropped = [], {}
    for node, reason in sorted(out.errors.items()):
        name = site_name_from(node, reason, names)
        if node in out.trained:
            continue  # left after sending its masked vector (unmask stage): its vector is in the mean
        if reason.startswith(f"{name}: "):
            refused.append((name, reason.removeprefix(f"{name}: ")))
        else:
            dropped[name] = reason
    for node in nodes:
        if node not in out.trained and node not in out.errors:
            why = f"no reply within train.round_timeout_s = {cfg.train.round_timeout_s:g}s"
            dropped[names.get(node, f"node-{node}")] = why
    to_aggregate, halted = [], None
    if out.aggregate is None:
        halted = (f"secure aggregation halted: {len(out.trained)} of {len(nodes)} sites sent masked vectors, too few "
                  f"for the reconstruction threshold (secagg.reconstruction_threshold = "
                  f"{cfg.secagg.reconstruction_threshold:g})")  # fmt: skip
    else:
        total = sum(int(a.metrics["num-examples"]) for a in accepted)
        to_aggregate = [_as_one_reply(grid, rnd, out.aggregate, total)]
    return Exchange(accepted, refused, dropped, to_aggregate, sum(out.payload.values()), halted)


def _as_one_reply(grid: Grid, rnd: int, mean: ArrayRecord, examples: int) -> Message:
    """The SecAgg+ mean as one reply, so FedAvg/FedProx keep it and FedAdam takes its server step from it."""
    meta = Metadata(run_id=grid.run.run_id, message_id=f"secagg-{rnd}", src_node_id=0, dst_node_id=0,
                    reply_to_message_id="", group_id=str(rnd), created_at=time.time(), ttl=60.0,
                    message_type=MessageType.TRAIN)  # fmt: skip
    return Message(content=RecordDict({"arrays": mean, "metrics": MetricRecord({"num-examples": examples})}),
                   metadata=meta)  # fmt: skip


def _no_reply(
    messages: list[Message], replies: list[Message], gone: dict[int, str], names: dict[int, str], cfg: RunConfig
) -> dict[str, str]:
    replied = {m.metadata.src_node_id for m in replies}
    dropped = {}
    for msg in messages:
        if (node := msg.metadata.dst_node_id) not in replied:
            why = gone.get(node, f"no reply within train.round_timeout_s = {cfg.train.round_timeout_s:g}s")
            dropped[names.get(node, f"node-{node}")] = why
    return dropped


def _trained_record(rnd: int, m: dict[str, Any]) -> dict[str, Any]:
    keys = {"epsilon": "epsilon", "noise-multiplier": "noise_multiplier", "sample-rate": "sample_rate",
            "clip-norm": "clip_norm", "train-loss": "train_loss", "wire-bytes": "bytes_sent",
            "train-seconds": "train_s"}  # fmt: skip
    out = {"round": rnd, "status": "trained", "num_examples": int(m["num-examples"]), "steps": int(m["steps"])}
    out |= {ours: m[theirs] for theirs, ours in keys.items() if theirs in m}
    return out


def _federated_evaluation(
    strategy: Any, rnd: int, arrays: ArrayRecord, base: dict, grid: Grid, cfg: RunConfig, names: dict[int, str]
) -> dict[str, float] | None:
    if cfg.train.fraction_evaluate == 0:
        return None
    messages = list(strategy.configure_evaluate(rnd, arrays, ConfigRecord(dict(base)), grid))
    replies, gone = _split_replies(messages, grid.send_and_receive(messages, timeout=cfg.train.round_timeout_s))
    good = [r for r in replies if not r.has_error()]
    for r in replies:
        if r.has_error():
            log(WARNING, "round %d: evaluation at site %s failed: %s", rnd, site_name(r, names), r.error.reason)
    for node, why in gone.items():
        log(WARNING, "round %d: evaluation at site %s failed: %s", rnd, names.get(node, f"node-{node}"), why)
    if not good:
        return None
    agg = strategy.aggregate_evaluate(rnd, good)
    return {"accuracy": float(agg["eval-accuracy"]), "loss": float(agg["eval-loss"]), "sites": len(good)}


def _learn_registered_names(grid: Grid, names: dict[int, str]) -> None:
    """Names given at `flwr supernode register --name`: a site that never replied is still named."""
    for node in grid.get_nodes():
        if node.name:
            names.setdefault(node.node_id, node.name)


def _split_replies(messages: list[Message], replies: Iterable[Message]) -> tuple[list[Message], dict[int, str]]:
    """Replies from sites, and the reason for each node the SuperLink answered for itself.

    flwr 1.41 answers a message to a node whose heartbeat lapsed (a crashed SuperNode,
    after up to 60 s) with an error reply from the SuperLink, not from the node; a node
    still believed alive just never replies. Either way the log must name the site.
    """
    sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    from_sites: list[Message] = []
    gone: dict[int, str] = {}
    for reply in replies:
        node = sent_to.get(reply.metadata.reply_to_message_id)
        if reply.has_error() and node is not None and reply.metadata.src_node_id != node:
            gone[node] = reply.error.reason or f"error code {reply.error.code}"
        else:
            from_sites.append(reply)
    return from_sites, gone


def _numpy(arrays: ArrayRecord) -> dict:
    return {k: v.numpy() for k, v in arrays.items()}


def _progress(rnd: int, cfg: RunConfig, record: dict[str, Any], asked: int) -> None:
    eps = [s["epsilon"] for s in record["sites"].values() if s.get("epsilon") is not None]
    fed = record["federated"]
    log(
        INFO,
        "round %d/%d | sites trained %d/%d | server acc %.4f | sites' acc %s | ε spent max %s (target %s) | %.1fs",
        rnd, cfg.train.rounds, record["sites_trained"], asked, record["server"]["accuracy"],
        f"{fed['accuracy']:.4f}" if fed else "-", f"{max(eps):.3f}" if eps else "-",
        f"{cfg.privacy.target_epsilon:g}" if cfg.privacy.enabled else "no DP", record["time_s"],
    )  # fmt: skip
