"""One message a round (issue 25, item 1): each round's training message carries the evaluation of its head.

A run of R rounds sends each site R training messages (plus round 0's statistics release) and exactly one
evaluation message, the final model's; every model is still scored, one round behind, and its federated
metrics are the ones a separate evaluation exchange of that model gives (the evaluation's noise is seeded
by the model's round, never by the message that carried it). The sites and the ServerApp answer in this
process (tests/inprocess_grid.py); the audit of the run passes, its coverage check included.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fedtransfer.cli.main import main
from fedtransfer.client import train_round
from fedtransfer.client.site import Declined, Site
from fedtransfer.common.config.run import RunConfig, config_from_dict
from fedtransfer.common.data.sources import Samples, SiteData
from fedtransfer.common.model.head import make_head
from fedtransfer.common.privacy.evaluation import NAMES, metrics_from_statistics, sum_statistics
from fedtransfer.common.privacy.ledger import PrivacyLedger
from fedtransfer.common.storage.audit_log import read_records
from fedtransfer.common.wire.protocol import RECORD_COUNTS, Cfg, Metric, Rec
from fedtransfer.server.audit.coverage import check_coverage
from fedtransfer.server.audit.findings import Entry, Evidence, Findings, SiteAudit
from fedtransfer.server.federation import checkpoint
from fedtransfer.server.federation.console import ConsoleFilter, final_evaluation_summary
from fedtransfer.server.federation.evaluation import Sampled, asked_of, asking, taken
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType

from tests.inprocess_grid import InProcessGrid, _serverapp_identity, fresh_site_cache, run_in_process
from tests.messages import train_message

ROUNDS = 3
SMALL = {
    "run_name": "one-message",
    "seed": 11,
    "device": "cpu",
    "backbone": {"image_size": 32},
    "data": {"source": "digits", "split": "iid", "num_sites": 2, "max_samples": 600},
    "train": {"rounds": ROUNDS, "local_epochs": 1, "protocol": "fedavg", "learning_rate": 0.5},
    "privacy": {"target_epsilon": 3.0, "target_delta": 1.0e-4, "accountant": "rdp"},  # feature_stats: round 0
    "personal": {"enabled": False},
}


def _config(tmp_path: Path, name: str, **train: Any) -> RunConfig:
    raw = SMALL | {"output_dir": str(tmp_path / name), "cache_dir": str(tmp_path / "cache")}
    return config_from_dict(raw | {"train": SMALL["train"] | train})


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _separately(cfg: RunConfig, run_dir: Path, rnd: int, fingerprint: str) -> dict[str, Any]:
    """Model `rnd` (its checkpoint) scored the old way: an evaluation message of its own to every site, on a
    fresh copy of the sites (`cfg`'s own folder: new ledgers, nothing cached), summed as the server sums."""
    raw = torch.load(checkpoint.path_for(run_dir, rnd), map_location="cpu", weights_only=True)
    head = {k: v.numpy() for k, v in raw["head"].items()}
    grid = InProcessGrid.for_simulation(cfg)
    config = ConfigRecord({Cfg.RUN_ID: "separately", Cfg.FINGERPRINT: fingerprint, Cfg.SERVER_ROUND: rnd})
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in head.items()})
    messages = [
        Message(RecordDict({Rec.ARRAYS: arrays, Rec.CONFIG: config}), node, MessageType.EVALUATE)
        for node in grid.get_node_ids()
    ]
    replies = grid.pull_messages(grid.push_messages(messages))
    assert len(replies) == len(messages) and not any(r.has_error() for r in replies)
    stats = [{k: v.numpy() for k, v in r.content[Rec.EVALUATION].items()} for r in replies]
    return metrics_from_statistics(sum_statistics(stats))


@pytest.mark.usefixtures("app_process_umask")
def test_each_site_gets_one_training_message_a_round_and_one_evaluation_message(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "run")
    grid = InProcessGrid.for_simulation(cfg)
    assert run_in_process(cfg, grid)["status"] == "completed"
    for node in grid.get_node_ids():
        sent = [m for m in grid.pushed if m.metadata.dst_node_id == node]
        kinds = [m.metadata.message_type for m in sent]
        assert kinds.count(MessageType.TRAIN) == ROUNDS + 1  # round 0 (the statistics) and rounds 1..R
        assert kinds.count(MessageType.EVALUATE) == 1 and kinds[-1] == MessageType.EVALUATE  # the final model's
        # round r's training message asks for the evaluation of the head it carries, model r - 1
        asked = [(m.content[Rec.CONFIG][Cfg.SERVER_ROUND], m.content[Rec.CONFIG].get(Cfg.EVALUATE_ROUND)) for m in sent]
        assert asked[:-1] == [(0, None)] + [(r, r - 1) for r in range(1, ROUNDS + 1)]

    run_dir = cfg.output_path
    metrics = _metrics(run_dir)
    assert [m["round"] for m in metrics] == list(range(ROUNDS + 1))
    assert all(m["federated"] and m["federated"]["sites"] == 2 for m in metrics)  # every model scored
    privacy = json.loads((run_dir / "privacy.json").read_text())["sites"]
    for site in ("site-0", "site-1"):
        assert [r["round"] for r in privacy[site]["evaluation"]["rounds"]] == list(range(ROUNDS + 1))
        log = read_records(run_dir / "sites" / site / "audit.jsonl")
        carried = [r for r in log if r["event"] == "evaluation-sent" and r.get("carried_by") == "training"]
        assert [(r["round"], r["message_type"]) for r in carried] == [(r, "train") for r in range(ROUNDS)]

    # the same statistics as a separate evaluation exchange of the same model: the noise is the model round's
    (started,) = [r for r in read_records(run_dir / "audit.jsonl") if r["event"] == "run-started"]
    with fresh_site_cache(), _serverapp_identity():
        for rnd in range(ROUNDS + 1):
            alone = _separately(_config(tmp_path, f"separately-{rnd}"), run_dir, rnd, started["fingerprint"])
            for key in ("accuracy", "loss", "balanced_accuracy", "auroc"):
                assert metrics[rnd]["federated"][key] == pytest.approx(alone[key], rel=1e-9, abs=1e-12), (rnd, key)

    report = tmp_path / "report"
    assert main(["audit", str(run_dir), "--report-dir", str(report)]) == 0
    audit = json.loads((report / "audit-report.json").read_text())
    rows = [c for s in audit["sites"] for c in s["coverage"] if c["event"] == "update-sent"]
    assert {c["covered_by"] for c in rows if c["name"] == Rec.EVALUATION} == {"evaluation"}


@pytest.mark.usefixtures("app_process_umask")
def test_training_does_not_depend_on_the_evaluation_it_carries(tmp_path: Path) -> None:
    """Scoring the head first changes nothing in training: the final model is that of a run scoring none."""
    with_evaluation = _config(tmp_path, "scored", local_epochs=1)
    without = _config(tmp_path, "unscored", local_epochs=1, fraction_evaluate=0.0)
    assert run_in_process(with_evaluation)["status"] == "completed"
    grid = InProcessGrid.for_simulation(without)
    assert run_in_process(without, grid)["status"] == "completed"
    assert not [m for m in grid.pushed if m.metadata.message_type == MessageType.EVALUATE]
    a, b = checkpoint.latest(with_evaluation.output_path), checkpoint.latest(without.output_path)
    assert a is not None and b is not None and a.head.keys() == b.head.keys()
    for name in a.head:
        assert np.array_equal(a.head[name], b.head[name]), name


@pytest.mark.usefixtures("app_process_umask")
def test_under_secure_aggregation_the_evaluation_rides_in_the_stage_2_reply(tmp_path: Path) -> None:
    """SecAgg+: the request is in the per-site FitIns config, the release beside the masked vector, never in it."""
    cfg = config_from_dict(
        SMALL
        | {"output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"), "secure_aggregation": True}
        | {"train": SMALL["train"] | {"rounds": 2}}
    )
    grid = InProcessGrid.for_simulation(cfg)
    assert run_in_process(cfg, grid)["status"] == "completed"
    evaluations = [m for m in grid.pushed if m.metadata.message_type == MessageType.EVALUATE]
    assert len(evaluations) == len(grid.get_node_ids())  # the final model's, once per site
    metrics = _metrics(cfg.output_path)
    assert [m["round"] for m in metrics] == [0, 1, 2]
    assert all(m["federated"] and m["federated"]["sites"] == 2 for m in metrics)
    for site in ("site-0", "site-1"):
        log = read_records(cfg.output_path / "sites" / site / "audit.jsonl")
        carried = [r["round"] for r in log if r["event"] == "evaluation-sent" and r.get("carried_by") == "training"]
        assert carried == [0, 1]
    report = tmp_path / "report"
    assert main(["audit", str(cfg.output_path), "--report-dir", str(report)]) == 0


def _train_message(node: int) -> Message:
    config = ConfigRecord({Cfg.SERVER_ROUND: 4})
    return Message(RecordDict({Rec.ARRAYS: ArrayRecord(), Rec.CONFIG: config}), node, MessageType.TRAIN)


def test_a_sampled_site_the_round_does_not_train_gets_its_evaluation_message_alone() -> None:
    """train.fraction_train < 1: the sample for evaluation is split between the round's training and the rest."""
    with _serverapp_identity():  # a message is made by a ServerApp
        _split_sample()


def _split_sample() -> None:
    evaluation = [Message(RecordDict(), node, MessageType.EVALUATE) for node in (1, 2, 3)]
    training = [_train_message(node) for node in (2, 3, 4)]
    asked = asked_of(Sampled(3, evaluation), (m.metadata.dst_node_id for m in training))
    assert asked is not None and asked.nodes == {2, 3}
    assert [m.metadata.dst_node_id for m in asked.alone] == [1]
    out = asking(training, asked)
    assert [m.content[Rec.CONFIG].get(Cfg.EVALUATE_ROUND) for m in out] == [3, 3, None]
    assert Cfg.EVALUATE_ROUND not in training[0].content[Rec.CONFIG]  # the strategy's shared record is untouched
    assert asked_of(None, [1, 2]) is None and asking(training, None) == training


def test_the_final_models_evaluation_has_its_console_line() -> None:
    line = final_evaluation_summary(3, 3, sites_accuracy=0.8, sites_measured=([0.7, 0.9], 40))
    assert line.startswith("final model (round 3) | sites' acc 0.8000 [0.700, 0.900] on 40 |")
    assert ConsoleFilter().show(f"\x1b[92mINFO \x1b[0m:      {line}") == line  # shown by default, like a round's
    assert final_evaluation_summary(3, 3, sites_accuracy=None).startswith("final model (round 3) | sites' acc - |")


DIM, CLASSES = 16, 3
SITE_RUN = {
    "train": {"protocol": "fedavg", "rounds": 3, "local_epochs": 1},
    "privacy": {"target_delta": 1e-3, "feature_stats": False, "accountant": "rdp"},
    "personal": {"enabled": False},
}


def _site(tmp_path: Path, n_test: int = 60) -> Site:
    """A site on random features: 80 training records, `n_test` test records, that has sent round 0's record
    counts (SITE_RUN has no feature statistics), as a coordinator asks first: a DP site with no released count
    declines to train (client/dp_count.py)."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(80 + n_test, DIM, generator=gen), torch.randint(0, CLASSES, (80 + n_test,), generator=gen)
    classes = tuple(str(c) for c in range(CLASSES))
    train = Samples(np.zeros((80, 1, 1, 1), np.uint8), y[:80].numpy(), classes)
    test = Samples(np.zeros((n_test, 1, 1, 1), np.uint8), y[80:].numpy(), classes)

    class Backbone:
        name, fingerprint, feature_dim, device = "b", "f" * 64, DIM, torch.device("cpu")

    data = SiteData("site-x", train, test)
    site = Site("site-x", data, Backbone(), tmp_path, 7, None, None, x[:80], y[:80], x[80:], y[80:])
    train_round.train(site, config_from_dict(SITE_RUN), _at_site(0, **{Cfg.RELEASE: RECORD_COUNTS}))
    return site


def _at_site(server_round: int, **extra: int | str) -> Message:
    return train_message(make_head(DIM, CLASSES, centred=False), server_round, **extra)


def test_a_site_scores_the_head_it_receives_then_trains_and_the_server_splits_the_reply(tmp_path: Path) -> None:
    site, cfg = _site(tmp_path), config_from_dict(SITE_RUN)
    reply = train_round.train(site, cfg, _at_site(2, **{Cfg.EVALUATE_ROUND: 1}))
    assert {Rec.ARRAYS, Rec.EVALUATION, Rec.EVALUATION_DP, Rec.METRICS} <= set(reply.keys())
    assert Metric.EVAL_EPSILON in reply[Rec.METRICS] and Metric.EPSILON in reply[Rec.METRICS]
    ledger = PrivacyLedger(site.ledger_path, run_key="r")
    assert [r["round"] for r in ledger.entry["rounds"]] == [0, 2]  # training: the message's round
    assert [r["round"] for r in ledger.evaluation["rounds"]] == [1]  # evaluation: the model's round
    log = read_records(site.audit_path)
    (sent,) = [r for r in log if r["event"] == "evaluation-sent"]
    (_, update) = [r for r in log if r["event"] == "update-sent"]  # round 0's counts, then round 2
    assert (sent["round"], sent["carried_by"], update["round"]) == (1, "training", 2)
    assert update["sent"]["tensors"][Rec.EVALUATION] == sent["statistics"]["sha256"]  # what the audit matches

    taken_out = taken(reply)  # the server's side: the evaluation out, a training reply as screened before
    assert taken_out is not None and set(taken_out[Rec.EVALUATION].keys()) == set(NAMES)
    assert list(reply.array_records) == [Rec.ARRAYS] and Metric.EVAL_EPSILON not in reply[Rec.METRICS]
    with pytest.raises(Declined, match="must be 2, the round of the head"):  # only the head it carries
        train_round.train(site, cfg, _at_site(3, **{Cfg.EVALUATE_ROUND: 0}))


def test_a_site_that_cannot_release_the_evaluation_still_trains(tmp_path: Path) -> None:
    """δ = 1e-3 is not below 1/n for 2,000 test records: the evaluation is declined and logged, training goes on."""
    site, cfg = _site(tmp_path, n_test=2000), config_from_dict(SITE_RUN)
    reply = train_round.train(site, cfg, _at_site(2, **{Cfg.EVALUATE_ROUND: 1}))
    assert Rec.ARRAYS in reply and Rec.EVALUATION not in reply and Metric.EVAL_EPSILON not in reply[Rec.METRICS]
    log = read_records(site.audit_path)
    (declined,) = [r for r in log if r["event"] == "evaluation-declined"]
    assert declined["round"] == 1 and "target_delta" in declined["reason"]
    assert [r["event"] for r in log if r["event"] in ("update-sent", "evaluation-sent")] == ["update-sent"] * 2
    assert PrivacyLedger(site.ledger_path, run_key="r").evaluation["rounds"] == []


def _coverage(site: Site, cfg: RunConfig, *, leave_out: str = "") -> tuple[SiteAudit, Findings]:
    """The audit's coverage check over the site's own log (less the records of event `leave_out`)."""
    records = [r for r in read_records(site.audit_path) if r["event"] != leave_out]
    ev = Evidence(site.state_dir, site.state_dir / "audit.jsonl", [site.audit_path], True, "r", cfg)
    ev.sites[site.name] = [Entry(site.audit_path, i, r) for i, r in enumerate(records, start=1)]
    audit, found = SiteAudit(site.name, str(site.audit_path)), Findings()
    check_coverage(audit, ev, found)
    return audit, found


def test_the_audit_covers_carried_statistics_only_with_the_release_that_made_them(tmp_path: Path) -> None:
    site, cfg = _site(tmp_path), config_from_dict(SITE_RUN)
    train_round.train(site, cfg, _at_site(2, **{Cfg.EVALUATE_ROUND: 1}))
    audit, found = _coverage(site, cfg)
    assert found.failures == []
    rows = {(c["event"], c["name"]): c["covered_by"] for c in audit.coverage}
    assert rows[("update-sent", Rec.EVALUATION)] == rows[("evaluation-sent", Rec.EVALUATION)] == "evaluation"
    assert rows[("update-sent", Rec.ARRAYS)] == "training"
    # statistics a training reply sent with no evaluation release of theirs in the log: covered by nothing
    audit, found = _coverage(site, cfg, leave_out="evaluation-sent")
    [failure] = found.failures
    assert failure.check == "coverage" and repr(str(Rec.EVALUATION)) in failure.reason
