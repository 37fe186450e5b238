"""A site answers a repeated training request (a resumed coordinator) from its reply cache, charging no ε."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from fedtransfer.client import client_app
from fedtransfer.client.replay import ReplyCache
from fedtransfer.common.config.run import BackboneConfig, config_from_dict, to_run_config
from fedtransfer.common.encoders.image import ImageBackbone, load_backbone
from fedtransfer.common.model.head import make_head
from fedtransfer.common.storage.audit_log import read_records, verify_chain
from fedtransfer.common.wire.exchange import arrays_to_numpy, head_to_arrays
from fedtransfer.common.wire.protocol import RECORD_COUNTS
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from tests.messages import to_site


@pytest.fixture
def context(tmp_path: Path) -> Context:
    cfg = config_from_dict(
        {
            "output_dir": str(tmp_path / "run"),
            "cache_dir": str(tmp_path / "cache"),
            "device": "cpu",
            "backbone": {"image_size": 32},
            "data": {"source": "digits", "num_sites": 2, "max_samples": 300},
            "train": {"rounds": 2, "local_epochs": 1, "protocol": "fedavg"},
            "privacy": {"target_delta": 1e-4, "feature_stats": False},
        }
    )
    return Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config=to_run_config(cfg),
    )


@functools.cache
def _backbone() -> ImageBackbone:
    return load_backbone(BackboneConfig(image_size=32), "cpu")


def _request(server_round: int, scale: float = 1.0, **extra: str) -> Message:
    backbone = _backbone()
    torch.manual_seed(0)  # the same global head each time it is asked for
    head = make_head(backbone.feature_dim, 10, 0)
    arrays = {k: torch.from_numpy(v * scale) for k, v in arrays_to_numpy(head_to_arrays(head)).items()}
    config = ConfigRecord(
        {
            "run-id": "0123abcd",
            "backbone-fingerprint": backbone.fingerprint,
            "app-version": "0.1.0",
            "server-round": server_round,
        }
        | extra
    )
    content = RecordDict({"arrays": ArrayRecord(arrays), "config": config})
    return to_site(
        content,
        message_id=f"m-{server_round}-{scale}",
        group_id=str(server_round),
        src_node_id=1,
        dst_node_id=7,
        ttl=3600.0,
    )


def _bytes(reply: Message) -> dict[str, bytes]:
    return {k: a.data for k, a in reply.content["arrays"].items()}


@pytest.mark.usefixtures("app_process_umask")  # it calls the ClientApp in this process
def test_repeated_request_is_replayed_without_training_or_new_epsilon(context: Context, tmp_path: Path) -> None:
    site_dir = tmp_path / "run" / "sites" / "site-0"
    released = client_app.train(_request(0, release=RECORD_COUNTS), context)  # under DP a site trains after it
    assert not released.has_error(), released.error
    first = client_app.train(_request(1), context)
    assert not first.has_error(), first.error
    ledger_after_first = (site_dir / "privacy-ledger.json").read_bytes()

    again = client_app.train(_request(1), context)  # what a resumed coordinator sends
    assert not again.has_error()
    assert _bytes(again) == _bytes(first)
    assert dict(again.content["metrics"]) == dict(first.content["metrics"])
    assert (site_dir / "privacy-ledger.json").read_bytes() == ledger_after_first

    log = site_dir / "audit.jsonl"
    assert verify_chain(log) == []
    events = [r for r in read_records(log) if r["event"] in ("update-sent", "reply-replayed")]
    assert [e["event"] for e in events] == ["update-sent", "update-sent", "reply-replayed"]  # round 0, then 1
    assert events[1]["update"] == events[2]["update"]

    # a different head in the same round is a new request: trained, and charged to the ledger
    other = client_app.train(_request(1, scale=0.5), context)
    assert not other.has_error()
    assert _bytes(other) != _bytes(first)
    (run,) = json.loads((site_dir / "privacy-ledger.json").read_text())["runs"].values()
    assert [r["round"] for r in run["rounds"]] == [0, 1, 1]


def test_cache_ignores_other_requests_and_refuses_odd_run_ids(tmp_path: Path) -> None:
    cache = ReplyCache(tmp_path)
    reply = RecordDict({"config": ConfigRecord({"name": "a"})})
    cache.save("run-1", "key-a", reply)
    assert cache.load("run-1", "key-b") is None
    assert cache.load("run-2", "key-a") is None
    assert dict(cache.load("run-1", "key-a")["config"]) == {"name": "a"}
    with pytest.raises(ValueError, match="run-id"):
        cache.save("../escape", "k", reply)
