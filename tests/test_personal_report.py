"""The server's personal-against-global report when some sites keep no personal model (policy.personal.keep: false).

Such a site sends only its global-model scores. Flower's mean needs the same keys in every
reply, so the server averages the global scores over every site and the personal ones over
only the sites that sent them (saying how many), and its per-site table shows the other
sites without a personal figure: never a 0, never a crash.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fedtransfer.common.config.run import RunConfig
from fedtransfer.common.wire.protocol import Metric, Rec, site_record
from fedtransfer.server.federation.loop import personal_summary
from fedtransfer.server.federation.recorder import RunRecorder
from fedtransfer.server.federation.rounds import evaluate_round
from fedtransfer.server.federation.sites import SiteBook
from fedtransfer.server.federation.strategy import ScreenedStrategy
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp.strategy import FedAvg

TIMEOUT = 30.0


def _metadata(message_id: str, src: int, dst: int, reply_to: str = "") -> Metadata:
    return Metadata(
        run_id=1,
        message_id=message_id,
        src_node_id=src,
        dst_node_id=dst,
        reply_to_message_id=reply_to,
        group_id="1",
        created_at=time.time(),
        ttl=600.0,
        message_type="evaluate",
    )


def _scores(examples: int, accuracy: float, personal: float | None) -> dict[str, float]:
    """An evaluation reply's metrics; `personal` None: the site keeps no personal model and sends none."""
    out = {
        Metric.NUM_EXAMPLES: examples,
        Metric.EVAL_LOSS: 1.0,
        Metric.EVAL_ACCURACY: accuracy,
        Metric.EVAL_BALANCED_ACCURACY: accuracy,
        Metric.EVAL_AUROC: 0.0,
        Metric.EVAL_AUROC_DEFINED: 0.0,
    }
    if personal is not None:
        out |= {Metric.PERSONAL_ACCURACY: personal, Metric.PERSONAL_BALANCED_ACCURACY: personal}
    return out


class _Grid:
    """Answers each evaluation message at once with the scores of the site at its node."""

    def __init__(self, sites: dict[str, dict[str, float]]) -> None:
        self.sites = sites
        self.sent: list[Message] = []

    def push_messages(self, messages: list[Message]) -> list[str]:
        self.sent = messages
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids: set[str]) -> list[Message]:
        out = []
        for node, (name, metrics) in enumerate(self.sites.items(), start=1):
            content = RecordDict({Rec.METRICS: MetricRecord(metrics), Rec.SITE: site_record(name)})
            out.append(Message(content=content, metadata=_metadata(f"r-{node}", node, SUPERLINK_NODE_ID, f"m-{node}")))
        return out


def _evaluate(sites: dict[str, dict[str, float]]) -> dict | None:
    """One federated evaluation with Flower's FedAvg behind the server's own strategy, as a run does it."""
    strategy = ScreenedStrategy(FedAvg(fraction_evaluate=1.0, min_evaluate_nodes=1, min_available_nodes=1), {}, 1)
    asked = [
        Message(content=RecordDict(), metadata=_metadata(f"m-{n}", SUPERLINK_NODE_ID, n))
        for n in range(1, len(sites) + 1)
    ]
    strategy.configure_evaluate = lambda *_: asked  # type: ignore[method-assign]  # the sampling is not under test
    arrays = ArrayRecord({"w": torch.zeros(2)})
    return evaluate_round(
        _Grid(sites), 1, arrays, config=ConfigRecord({}), strategy=strategy, book=SiteBook(), timeout=TIMEOUT
    )  # type: ignore[arg-type]


def test_a_site_without_a_personal_model_is_left_out_of_the_personal_mean_only() -> None:
    out = _evaluate(
        {"site-a": _scores(100, 0.5, 0.9), "site-b": _scores(300, 0.7, None), "site-c": _scores(100, 0.6, 0.8)}
    )
    assert out is not None
    assert out["sites"] == 3 and out["accuracy"] == pytest.approx((50 + 210 + 60) / 500)  # the global mean: all
    assert out["personal_sites"] == 2
    assert out["personal_accuracy"] == pytest.approx(0.85)  # (0.9 + 0.8) / 2, not (90 + 0 + 80) / 500
    assert out["global_accuracy_personal_sites"] == pytest.approx(0.55)  # the same two sites, global model
    assert out["per_site"]["site-b"] == {"accuracy": 0.7, "balanced_accuracy": 0.7}
    assert out["per_site"]["site-a"]["personal_accuracy"] == pytest.approx(0.9)
    line = personal_summary(out)
    assert "on the 2 of 3 sites with a personal model: global 0.5500 personal 0.8500" in line
    assert "site-a 0.500->0.900" in line and "site-b 0.700 (no personal model)" in line and "nan" not in line


def test_without_any_personal_model_the_report_has_no_personal_part() -> None:
    out = _evaluate({"site-a": _scores(100, 0.5, None), "site-b": _scores(300, 0.7, None)})
    assert out is not None and out["accuracy"] == pytest.approx(0.65)
    assert not {"personal_accuracy", "personal_sites", "per_site"} & set(out)


def test_every_site_with_a_personal_model_weighs_by_its_test_examples() -> None:
    out = _evaluate({"site-a": _scores(100, 0.5, 0.9), "site-b": _scores(300, 0.7, 0.5)})
    assert out is not None and out["personal_sites"] == 2
    assert out["personal_accuracy"] == pytest.approx((90 + 150) / 400)
    assert out["global_accuracy_personal_sites"] == pytest.approx(out["accuracy"])


def test_status_json_ends_with_the_personal_means_over_the_sites_that_keep_one(tmp_path: Path) -> None:
    fed = _evaluate({"site-a": _scores(100, 0.5, 0.9), "site-b": _scores(300, 0.7, None)})
    assert fed is not None
    cfg = RunConfig(output_dir=str(tmp_path))
    recorder = RunRecorder(cfg, "r1", {})
    line = {"round": 1, "aggregated": True, "server": {"accuracy": 0.6}, "sites": {}, "federated": fed}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(line) + "\n")
    summary = recorder.finish({"w": np.zeros(2, dtype=np.float32)}, 0.6, None, "not under test")
    assert summary["final_sites"]["site-b"] == {"accuracy": 0.7, "balanced_accuracy": 0.7}
    assert summary["final_personal"] == {
        "personal_accuracy": pytest.approx(0.9),
        "personal_sites": 1,
        "global_accuracy_personal_sites": pytest.approx(0.5),
    }
