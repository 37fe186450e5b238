"""Federated evaluation as a DP release (issue 23, item 1): what a site sends, what it costs, what the server derives.

A site's evaluation reply carries noisy sufficient statistics of its test split, never a plain metric;
the release is charged to the evaluation's own budget (parallel to training's), and the server computes
the federated metrics from the sum of the sites' statistics.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fedtransfer.client.evaluate_round import evaluate
from fedtransfer.client.site import Declined, Site
from fedtransfer.client.site_log import record
from fedtransfer.client.train_round import local_head
from fedtransfer.common.config.run import RunConfig
from fedtransfer.common.model.head import evaluate_head, make_head
from fedtransfer.common.privacy.calibration import epsilon_of
from fedtransfer.common.privacy.coverage import sent_values
from fedtransfer.common.privacy.evaluation import (
    CLASSES,
    NAMES,
    OVERALL,
    SCORES,
    W_CLASSES,
    W_OVERALL,
    check_statistics,
    evaluation_statistics,
    metrics_from_statistics,
    sum_statistics,
    w_scores,
)
from fedtransfer.common.privacy.fedsgd import Units
from fedtransfer.common.privacy.ledger import BudgetExceeded, PrivacyLedger
from fedtransfer.common.storage.audit_log import read_records
from fedtransfer.common.wire.exchange import head_to_arrays
from fedtransfer.common.wire.protocol import Event, Metric, Rec, site_record
from fedtransfer.server.audit.coverage import check_coverage
from fedtransfer.server.audit.findings import Entry, Evidence, Findings, SiteAudit
from fedtransfer.server.federation.evaluation import evaluate_round
from fedtransfer.server.federation.sites import SiteBook
from fedtransfer.server.federation.strategy import ScreenedStrategy
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp.strategy import FedAvg

from tests.messages import to_site

DIM, NUM_CLASSES = 8, 3


def _data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return torch.randn(NUM_CLASSES, DIM, generator=torch.Generator().manual_seed(1))[y] + torch.randn(
        n, DIM, generator=g
    ), y


def _weighted(stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """The vector the Gaussian is calibrated on: each block times its weight."""
    weights = (W_OVERALL, W_CLASSES, w_scores(NUM_CLASSES))
    return torch.cat([stats[n].flatten() * w for n, w in zip(NAMES, weights, strict=True)])


@pytest.mark.parametrize("per_user", [1, 3])
def test_one_unit_moves_the_released_vector_by_at_most_one(per_user: int) -> None:
    """The release's L2 sensitivity is 1 (the Gaussian's σ is calibrated for it), per record or per person."""
    torch.manual_seed(0)
    head = make_head(DIM, NUM_CLASSES)
    with torch.no_grad():
        head[-1].weight.mul_(40.0)  # confident scores: losses past LOSS_CAP, scores in the extreme bins
    x, y = _data(60)
    users = torch.arange(60) // per_user
    full = _weighted(evaluation_statistics(head, x, y, NUM_CLASSES, Units.of_users(users)))
    for gone in range(0, 60, per_user):
        keep = users != users[gone]
        rest = evaluation_statistics(head, x[keep], y[keep], NUM_CLASSES, Units.of_users(users[keep]))
        assert torch.linalg.vector_norm(full - _weighted(rest)) <= 1.0 + 1e-9


def test_exact_statistics_give_the_sites_own_metrics() -> None:
    """Without noise the server's metrics are the site's: accuracy and balanced accuracy exactly, AUROC by bins."""
    torch.manual_seed(0)
    head = make_head(DIM, NUM_CLASSES)
    x, y = _data(300)
    stats = evaluation_statistics(head, x, y, NUM_CLASSES, Units.records(300))
    got = metrics_from_statistics({k: v.numpy() for k, v in stats.items()})
    truth = evaluate_head(head, x, y)
    assert got["accuracy"] == pytest.approx(truth.accuracy)
    assert got["balanced_accuracy"] == pytest.approx(truth.balanced_accuracy)
    assert got["loss"] == pytest.approx(truth.loss, rel=1e-5)
    assert got["auroc"] == pytest.approx(truth.auroc, abs=0.03)


def _site(tmp_path: Path, n_test: int = 150) -> Site:
    train_x, train_y = _data(200, seed=2)
    test_x, test_y = _data(n_test, seed=3)
    encoder = SimpleNamespace(device=torch.device("cpu"), feature_dim=DIM, name="test-encoder", fingerprint="fp")
    split = SimpleNamespace(classes=list(range(NUM_CLASSES)), users=None)
    data = SimpleNamespace(train=split, test=split)
    return Site("site-0", data, encoder, tmp_path, 7, None, None, train_x, train_y, test_x, test_y, True)  # type: ignore[arg-type]


def _message(server_round: int, arrays: ArrayRecord) -> Message:
    config = ConfigRecord({"server-round": server_round, "run-id": "r1", "backbone-fingerprint": "fp"})
    return to_site(
        RecordDict({"config": config, "arrays": arrays}), message_type="evaluate", message_id=f"m{server_round}"
    )


def _cfg(**privacy: object) -> RunConfig:
    cfg = RunConfig()
    return replace(
        cfg,
        train=replace(cfg.train, rounds=2, evaluate_every=1),
        privacy=replace(cfg.privacy, feature_stats=False, **privacy),
        head=replace(cfg.head, hidden=0),
        personal=replace(cfg.personal, enabled=False),  # the final model's choice is not under test
    )


def test_the_reply_is_noisy_statistics_charged_to_the_evaluation_budget_only(tmp_path: Path) -> None:
    site, cfg = _site(tmp_path), _cfg(evaluation_epsilon=2.0)
    arrays = head_to_arrays(local_head(site, cfg, None, NUM_CLASSES))
    replies = [evaluate(site, cfg, _message(rnd, arrays)) for rnd in (1, 2)]
    for reply in replies:
        assert set(reply[Rec.EVALUATION]) == set(NAMES)
        sent = {k for r in reply.metric_records.values() for k in r}
        assert sent == {Metric.EVAL_EPSILON}  # no loss, accuracy, AUROC or count in the clear
        count = float(reply[Rec.EVALUATION][OVERALL].numpy()[1])
        assert count != len(site.test_y) and abs(count - len(site.test_y)) < 100  # noisy, not wild
    ledger = PrivacyLedger(site.ledger_path, run_key="r1")
    assert ledger.history == []  # the training budget is untouched: parallel composition
    spent = epsilon_of(ledger.evaluation_history, cfg.privacy.target_delta, cfg.privacy.accountant)
    assert spent == pytest.approx(float(replies[-1][Rec.METRICS][Metric.EVAL_EPSILON]))
    assert 1.5 < spent <= 2.0 + 1e-6  # the two planned releases use the evaluation budget, not more
    sent = [r for r in read_records(site.audit_path) if r["event"] == "evaluation-sent"]
    assert [r["composition"] for r in sent] == ["parallel", "parallel"] and all(r["dp"] for r in sent)
    again = evaluate(site, cfg, _message(2, arrays))  # a resumed server repeating round 2: the same bytes, no charge
    assert again[Rec.EVALUATION][OVERALL].numpy().tolist() == replies[-1][Rec.EVALUATION][OVERALL].numpy().tolist()
    assert len(PrivacyLedger(site.ledger_path, run_key="r1").evaluation_history) == 2
    with pytest.raises(BudgetExceeded):  # a third evaluation the plan did not count is refused
        evaluate(site, cfg, _message(3, arrays))


def test_a_person_on_both_sides_of_the_split_stops_the_evaluation(tmp_path: Path) -> None:
    """Under privacy.unit: user the two budgets are parallel only when the split is by person."""
    site, cfg = _site(tmp_path, n_test=20), _cfg(unit="user", synthetic_users=2)
    users = SimpleNamespace(astype=lambda _: np.array(["ann", "bob"] * 10))
    split = SimpleNamespace(classes=list(range(NUM_CLASSES)), users=users, user_codes=lambda: np.arange(20) % 2)
    site = replace(site, data=SimpleNamespace(train=split, test=split))
    arrays = head_to_arrays(local_head(site, cfg, None, NUM_CLASSES))
    with pytest.raises(Declined, match="split the site's data by person"):
        evaluate(site, cfg, _message(1, arrays))
    assert not site.ledger_path.exists() or PrivacyLedger(site.ledger_path, run_key="r1").evaluation_history == []


class _Grid:
    """Answers each evaluation message with the released statistics of the site at its node."""

    def __init__(self, sites: dict[str, dict[str, np.ndarray]]) -> None:
        self.sites = sites

    def push_messages(self, messages: list[Message]) -> list[str]:
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids: set[str]) -> list[Message]:
        out = []
        for node, (name, stats) in enumerate(self.sites.items(), start=1):
            record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in stats.items()})
            content = RecordDict({Rec.EVALUATION: record, Rec.SITE: site_record(name)})
            meta = Metadata(
                run_id=1,
                message_id=f"r-{node}",
                src_node_id=node,
                dst_node_id=SUPERLINK_NODE_ID,
                reply_to_message_id=f"m-{node}",
                group_id="1",
                created_at=time.time(),
                ttl=600.0,
                message_type="evaluate",
            )
            out.append(Message(content=content, metadata=meta))
        return out


def _server_evaluates(sites: dict[str, dict[str, np.ndarray]]) -> object:
    strategy = ScreenedStrategy(FedAvg(fraction_evaluate=1.0, min_evaluate_nodes=1, min_available_nodes=1), {}, 1)

    def meta(n: int) -> Metadata:
        return Metadata(
            run_id=1,
            message_id=f"m-{n}",
            src_node_id=SUPERLINK_NODE_ID,
            dst_node_id=n,
            reply_to_message_id="",
            group_id="1",
            created_at=time.time(),
            ttl=600.0,
            message_type="evaluate",
        )

    asked = [Message(content=RecordDict(), metadata=meta(n)) for n in range(1, len(sites) + 1)]
    strategy.configure_evaluate = lambda *_: asked  # type: ignore[method-assign]  # the sampling is not under test
    arrays = ArrayRecord({"w": torch.zeros(2)})
    return evaluate_round(
        _Grid(sites),  # type: ignore[arg-type]
        1,
        arrays,
        config=ConfigRecord({}),
        strategy=strategy,
        book=SiteBook(),
        timeout=30.0,
        num_classes=NUM_CLASSES,
    )


def test_the_server_computes_the_metrics_from_the_sum_and_refuses_malformed_statistics() -> None:
    torch.manual_seed(0)
    head = make_head(DIM, NUM_CLASSES)
    (xa, ya), (xb, yb) = _data(100, seed=4), _data(300, seed=5)
    a = {k: v.numpy() for k, v in evaluation_statistics(head, xa, ya, NUM_CLASSES, Units.records(100)).items()}
    b = {k: v.numpy() for k, v in evaluation_statistics(head, xb, yb, NUM_CLASSES, Units.records(300)).items()}
    bad = dict(a) | {SCORES: np.zeros((NUM_CLASSES, 2, 3))}
    out = _server_evaluates({"site-a": a, "site-b": b, "site-c": bad})
    both = evaluate_head(head, torch.cat([xa, xb]), torch.cat([ya, yb]))
    assert out.metrics is not None and out.metrics["sites"] == 2  # site-c's release was refused
    assert out.metrics["accuracy"] == pytest.approx(both.accuracy)  # pooled, as if one test split
    assert metrics_from_statistics(sum_statistics([a, b]))["accuracy"] == pytest.approx(both.accuracy)
    assert check_statistics(bad, NUM_CLASSES) is not None and check_statistics(a, NUM_CLASSES) is None
    assert check_statistics(dict(a) | {CLASSES: np.full((2, NUM_CLASSES), np.nan)}, NUM_CLASSES) is not None


def _coverage(site: Site, cfg: RunConfig) -> tuple[SiteAudit, Findings]:
    """The audit's coverage check over the site's own log, as `fedtransfer audit` runs it."""
    entries = [Entry(site.audit_path, i, r) for i, r in enumerate(read_records(site.audit_path), start=1)]
    ev = Evidence(site.state_dir, site.state_dir / "audit.jsonl", [site.audit_path], True, "r1", cfg)
    ev.sites[site.name] = entries
    audit, found = SiteAudit(site.name, str(site.audit_path)), Findings()
    check_coverage(audit, ev, found)
    return audit, found


def test_every_value_sent_is_covered_and_one_extra_plain_metric_fails_the_audit(tmp_path: Path) -> None:
    site, cfg = _site(tmp_path), _cfg()
    arrays = head_to_arrays(local_head(site, cfg, None, NUM_CLASSES))
    reply = evaluate(site, cfg, _message(1, arrays))
    audit, found = _coverage(site, cfg)
    assert found.failures == []
    covered = {(c["kind"], c["name"]): c["covered_by"] for c in audit.coverage}
    assert covered[("tensors", Rec.EVALUATION)] == "evaluation"
    assert covered[("metrics", Metric.EVAL_EPSILON)] == "accounting"
    # a site that also sends its plain accuracy: the value is logged as sent, and nothing covers it
    reply[Rec.METRICS][Metric.EVAL_ACCURACY] = 0.9
    record(site, _message(2, arrays), Event.EVALUATION_SENT, release="evaluation", sent=sent_values(reply))
    audit, found = _coverage(site, cfg)
    [failure] = found.failures
    assert failure.check == "coverage" and repr(str(Metric.EVAL_ACCURACY)) in failure.reason
    [row] = [c for c in audit.coverage if c["name"] == Metric.EVAL_ACCURACY]
    assert (row["round"], row["value"], row["covered_by"]) == (2, 0.9, "NOT COVERED")  # the report's table row
