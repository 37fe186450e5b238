"""What crosses the wire: only the head's tensors, checked on arrival; refusals become error replies."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from fedtransfer.client import client_app, train_round
from fedtransfer.client.site import Declined, Site
from fedtransfer.common.config.run import (
    BackboneConfig,
    DataConfig,
    PrivacyConfig,
    RunConfig,
    TrainConfig,
    to_run_config,
)
from fedtransfer.common.data.sources import Samples, SiteData
from fedtransfer.common.encoders.image import ImageBackbone, load_backbone
from fedtransfer.common.model.head import make_head
from fedtransfer.common.wire.exchange import check_arrays, head_spec, head_to_arrays, load_head, wire_bytes
from fedtransfer.common.wire.protocol import RECORD_COUNTS, REFUSAL_CODE, DPRecord, Refusal, site_of
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.serde import message_to_proto

from tests.messages import to_site

CLASSES = 10
# fedavg: a trained head goes back (fedsgd's noisy sums: test_fedsgd.py)
CFG = RunConfig(
    train=TrainConfig(rounds=2, local_epochs=1, batch_size=50, protocol="fedavg"),
    privacy=PrivacyConfig(target_delta=1e-3, feature_stats=False, accountant="rdp"),
)


@pytest.fixture(scope="module")
def backbone() -> ImageBackbone:
    return load_backbone(BackboneConfig(image_size=32))


def _site(backbone: ImageBackbone, state_dir: Path, n: int = 100) -> Site:
    gen = torch.Generator().manual_seed(0)
    labels = np.arange(n) % CLASSES
    samples = Samples(np.zeros((n, 1, 1, 1), dtype=np.uint8), labels, tuple(str(c) for c in range(CLASSES)))
    return Site(
        name="site-x",
        data=SiteData("site-x", samples, samples),
        backbone=backbone,
        state_dir=state_dir,
        secret_seed=7,
        policy=None,
        accept_app_version=None,
        train_x=torch.randn(n, backbone.feature_dim, generator=gen),
        train_y=torch.from_numpy(labels),
        test_x=torch.randn(n, backbone.feature_dim, generator=gen),
        test_y=torch.from_numpy(labels),
    )


def _message(arrays: ArrayRecord, **config: str | int) -> Message:
    return to_site(RecordDict({"arrays": arrays, "config": ConfigRecord(config)}), message_id="m-1", ttl=3600.0)


def _train_message(backbone: ImageBackbone, **changes: str | int) -> Message:
    config: dict[str, str | int] = {
        "server-round": 1,
        "run-id": "run-a",
        "app-version": "0.1.0",
        "backbone-fingerprint": backbone.fingerprint,
    } | changes
    return _message(head_to_arrays(make_head(backbone.feature_dim, CLASSES)), **config)


@pytest.fixture(scope="module")
def reply(backbone: ImageBackbone, tmp_path_factory: pytest.TempPathFactory) -> tuple[Message, RecordDict]:
    site, msg = _site(backbone, tmp_path_factory.mktemp("site")), _train_message(backbone)
    train_round.train(site, CFG, _train_message(backbone, **{"server-round": 0, "release": RECORD_COUNTS}))
    return msg, train_round.train(site, CFG, msg)  # round 1, after round 0's record counts (client/dp_count.py)


def test_reply_carries_only_the_head(backbone: ImageBackbone, reply: tuple[Message, RecordDict]) -> None:
    _, content = reply
    spec = head_spec(make_head(backbone.feature_dim, CLASSES))
    assert list(spec) == ["head.1.weight", "head.1.bias"]
    assert list(content.array_records) == ["arrays"], "no other ArrayRecord may leave the site"
    assert list(content["arrays"].keys()) == list(spec)
    assert check_arrays(content["arrays"], spec) is None
    assert all(isinstance(v, int | float) for v in content["metrics"].values())
    assert content["metrics"]["epsilon"] > 0
    dp = DPRecord.from_mapping(content["dp"])  # the DP parameters travel typed, spelt as in the site's log
    assert dp.noise_multiplier > 0 and dp.steps == content["metrics"]["steps"] and dp.accountant == "rdp"
    assert "train-loss" not in content["metrics"], "under DP the loss is an unaccounted release: it stays at the site"
    assert site_of(content) == "site-x"


def test_reply_size_is_the_head_and_nothing_more(backbone: ImageBackbone, reply: tuple[Message, RecordDict]) -> None:
    msg, content = reply
    floor = (backbone.feature_dim + 1) * CLASSES * 4  # float32 weight and bias
    sent = wire_bytes(content["arrays"])
    assert content["metrics"]["wire-bytes"] == sent
    assert floor <= sent <= 1.1 * floor
    serialized = message_to_proto(Message(content, reply_to=msg)).ByteSize()  # the whole reply, as protobuf
    assert floor <= serialized <= 1.1 * floor
    backbone_bytes = sum(p.numel() * p.element_size() for p in backbone.module.parameters())
    assert backbone_bytes > 100 * serialized


def test_different_backbone_fingerprint_is_declined(backbone: ImageBackbone, tmp_path: Path) -> None:
    msg = _train_message(backbone, **{"backbone-fingerprint": "0" * 64})
    with pytest.raises(Declined, match="fingerprint"):
        train_round.train(_site(backbone, tmp_path), CFG, msg)
    assert not (tmp_path / "privacy-ledger.json").exists(), "nothing is spent on a declined round"


def test_pinned_app_version_is_enforced(backbone: ImageBackbone, tmp_path: Path) -> None:
    site = dataclasses.replace(_site(backbone, tmp_path), accept_app_version="0.0.9")  # a Site is frozen
    with pytest.raises(Declined, match=r"pins app version 0\.0\.9"):
        train_round.train(site, CFG, _train_message(backbone))


def _arrays(**tensors: torch.Tensor) -> ArrayRecord:
    return ArrayRecord({k.replace("_", "."): v for k, v in tensors.items()})


HEAD = make_head(8, 3)
SPEC = head_spec(HEAD)
W, B = HEAD[1].weight.detach(), HEAD[1].bias.detach()


def _with(index: int, value: float) -> torch.Tensor:
    out = B.clone()
    out[index] = value
    return out


@pytest.mark.parametrize(
    ("arrays", "named"),
    [
        (_arrays(head_1_weight=W), r"missing \['head\.1\.bias'\]"),
        (_arrays(head_1_weight=W, head_1_bias=B, head_0_scale=B), r"unexpected \['head\.0\.scale'\]"),
        (_arrays(head_1_weight=W, head_1_biaz=B), r"missing \['head\.1\.bias'\], unexpected \['head\.1\.biaz'\]"),
        (_arrays(head_1_weight=W[:, :4], head_1_bias=B), r"head\.1\.weight is float32\[3, 4\].*\[3, 8\]"),
        (_arrays(head_1_weight=W.double(), head_1_bias=B), r"head\.1\.weight is float64.*needs float32"),
        (_arrays(head_1_weight=W, head_1_bias=_with(1, math.nan)), r"head\.1\.bias holds NaN or Inf"),
        (_arrays(head_1_weight=W, head_1_bias=_with(2, math.inf)), r"head\.1\.bias holds NaN or Inf"),
    ],
)
def test_check_arrays_names_the_problem(arrays: ArrayRecord, named: str) -> None:
    reason = check_arrays(arrays, SPEC)
    assert reason is not None
    assert re.search(named, reason), reason
    with pytest.raises(ValueError, match="head update rejected"):
        load_head(make_head(8, 3), arrays)


def test_check_arrays_bounds_the_norm() -> None:
    arrays = head_to_arrays(HEAD)
    norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in (W, B)))
    assert check_arrays(arrays, SPEC, max_norm=norm * 1.01) is None
    reason = check_arrays(arrays, SPEC, max_norm=norm * 0.99)
    assert reason is not None
    assert "exceeds train.max_update_norm" in reason


def test_load_head_round_trips() -> None:
    other = make_head(8, 3)
    load_head(other, head_to_arrays(HEAD))
    assert torch.equal(other[1].weight, W)
    assert torch.equal(other[1].bias, B)


def _context(tmp_path: Path, **overrides: object) -> Context:
    cfg = RunConfig(
        output_dir=str(tmp_path / "out"),
        cache_dir=str(tmp_path / "cache"),
        device="cpu",
        backbone=BackboneConfig(image_size=32),
        data=DataConfig(source="digits", num_sites=2, max_samples=60),
    )
    run_config = to_run_config(cfg) | overrides
    node_config = {"partition-id": 0, "num-partitions": 2}
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)


@pytest.mark.usefixtures("app_process_umask")  # it calls the ClientApp in this process
def test_malformed_message_becomes_an_error_reply(backbone: ImageBackbone, tmp_path: Path) -> None:
    msg = _message(head_to_arrays(make_head(backbone.feature_dim, CLASSES)), **{"server-round": 1, "run-id": "r"})
    answer = client_app.train(msg, _context(tmp_path))
    assert answer.has_error()
    refusal = Refusal.from_error(answer.error)
    assert answer.error.code == REFUSAL_CODE and refusal is not None
    assert refusal.site == "site-0"
    assert "backbone-fingerprint" in refusal.reason
    assert answer.metadata.reply_to_message_id == msg.metadata.message_id


@pytest.mark.usefixtures("app_process_umask")  # it calls the ClientApp in this process
def test_bad_run_config_becomes_an_error_reply(backbone: ImageBackbone, tmp_path: Path) -> None:
    answer = client_app.train(_train_message(backbone), _context(tmp_path, **{"train.rounds": 0}))
    assert answer.has_error()
    assert "train.rounds" in answer.error.reason
