"""A deployed site's prepared state (client/prepared.py): used when valid, never trusted when not.

Flower starts a ClientApp process per message; these tests play such processes by building
the site again with an empty process cache. Whether the backbone was built is counted on
the registry's `load_encoder`, not timed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from fedtransfer.client import prepared, train_round
from fedtransfer.client.prepared import PreparedEncoder, PreparedState, remembered_plan, site_encoder
from fedtransfer.client.site import Site, get_site
from fedtransfer.common.config.run import BackboneConfig, RunConfig, config_from_dict, to_run_config
from fedtransfer.common.data.federation import simulate_federation
from fedtransfer.common.encoders import registry as encoder_registry
from fedtransfer.common.encoders.feature_cache import extract
from fedtransfer.common.encoders.interface import EncoderError
from fedtransfer.common.encoders.process_cache import ProcessCache
from fedtransfer.common.model.head import make_head
from fedtransfer.common.privacy.calibration import plan_dp
from fedtransfer.common.privacy.mechanisms import fedavg_local
from fedtransfer.common.wire.exchange import head_to_arrays
from fedtransfer.common.wire.protocol import RECORD_COUNTS
from flwr.app import ConfigRecord, Context, Message, RecordDict

from tests.messages import to_site

APP_ROOT = Path(__file__).resolve().parent.parent


class FakeEncoder:
    """An encoder whose fingerprint is its weights file's SHA-256, as a real one's follows its weights."""

    kind, feature_dim, device = "image", 4, torch.device("cpu")

    def __init__(self, cfg: BackboneConfig) -> None:
        self.name = cfg.name
        self.fingerprint = hashlib.sha256(Path(str(cfg.weights_file)).read_bytes()).hexdigest()
        self.size = cfg.image_size

    def embed(self, inputs: Any) -> torch.Tensor:
        return torch.ones(len(inputs), self.feature_dim)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "image_size": self.size}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}


class Loads:
    """Counts how often an encoder is really built."""

    def __init__(self, build: Any) -> None:
        self.count, self.build = 0, build
        functools.update_wrapper(self, build)  # the same name: a plan's record is keyed by its planner's name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.count += 1
        return self.build(*args, **kwargs)


def _weights(tmp_path: Path, content: bytes = b"weights v1") -> BackboneConfig:
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    return BackboneConfig(image_size=32, weights_file=str(path), weights_sha256=hashlib.sha256(content).hexdigest())


def _state(tmp_path: Path, secret: int = 1234) -> PreparedState:
    return PreparedState(tmp_path / "state" / "prepared", secret)


def _encoder(cfg: BackboneConfig, state: PreparedState, loads: Loads) -> Any:
    return site_encoder(cfg, "cpu", state, lambda: loads(cfg))


def test_the_identity_is_recorded_once_and_then_used_without_loading(tmp_path: Path) -> None:
    cfg, state, loads = _weights(tmp_path), _state(tmp_path), Loads(FakeEncoder)
    first = _encoder(cfg, state, loads)
    again = _encoder(cfg, state, loads)
    assert loads.count == 1 and isinstance(again, PreparedEncoder) and not again.loaded
    assert (again.fingerprint, again.describe(), again.feature_dim) == (first.fingerprint, first.describe(), 4)


def test_a_changed_weights_file_or_config_is_a_new_encoder(tmp_path: Path) -> None:
    cfg, state, loads = _weights(tmp_path), _state(tmp_path), Loads(FakeEncoder)
    before = _encoder(cfg, state, loads).fingerprint
    Path(str(cfg.weights_file)).write_bytes(b"weights v2")  # same path, same config: other weights
    changed = _encoder(cfg, state, loads)
    assert loads.count == 2 and not isinstance(changed, PreparedEncoder) and changed.fingerprint != before
    assert isinstance(_encoder(cfg, state, loads), PreparedEncoder)  # recorded again, for the new file
    other = BackboneConfig(image_size=64, weights_file=cfg.weights_file, weights_sha256=cfg.weights_sha256)
    assert not isinstance(_encoder(other, state, loads), PreparedEncoder) and loads.count == 3


def test_a_weights_file_is_hashed_again_when_it_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker keeps a file's digest by its stat; a file written moments ago is hashed every time (racy)."""
    hashed = Loads(prepared.file_sha256)
    monkeypatch.setattr(prepared, "file_sha256", hashed)
    cfg, state, loads = _weights(tmp_path), _state(tmp_path), Loads(FakeEncoder)
    path = Path(str(cfg.weights_file))
    _encoder(cfg, state, loads)
    assert isinstance(_encoder(cfg, state, loads), PreparedEncoder) and hashed.count == 2  # just written: no memory
    monkeypatch.setattr(prepared, "RACY_NS", -(10**12))  # as if the file had been written long ago
    for _ in range(3):
        assert isinstance(_encoder(cfg, state, loads), PreparedEncoder)
    assert hashed.count == 3 and loads.count == 1  # hashed once for three messages

    fresh = path.with_name("weights.new")
    fresh.write_bytes(b"weights v2")  # same size, replaced under the same name: another inode
    os.replace(fresh, path)
    assert not isinstance(_encoder(cfg, state, loads), PreparedEncoder) and loads.count == 2
    before = os.stat(path)
    path.write_bytes(b"weights v3")  # rewritten in place, same size; a later mtime, as a later write has
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1))
    changed = _encoder(cfg, state, loads)
    assert not isinstance(changed, PreparedEncoder) and loads.count == 3
    assert changed.fingerprint == hashlib.sha256(b"weights v3").hexdigest()


@pytest.mark.parametrize("tamper", ["fingerprint", "torn", "other-secret"])
def test_a_tampered_record_is_not_trusted(tmp_path: Path, tamper: str) -> None:
    cfg, state, loads = _weights(tmp_path), _state(tmp_path), Loads(FakeEncoder)
    true = _encoder(cfg, state, loads).fingerprint
    (record,) = state.folder.glob("encoder-*.json")
    if tamper == "fingerprint":  # e.g. to pass another model's fingerprint off as this site's
        data = json.loads(record.read_text())
        data["value"]["fingerprint"] = "f" * 64
        record.write_text(json.dumps(data))
    elif tamper == "torn":
        record.write_text(record.read_text()[:40])
    reader = _state(tmp_path, secret=999) if tamper == "other-secret" else state
    encoder = _encoder(cfg, reader, loads)
    assert loads.count == 2 and not isinstance(encoder, PreparedEncoder) and encoder.fingerprint == true
    assert isinstance(_encoder(cfg, reader, loads), PreparedEncoder)  # rewritten under the reader's own MAC


def test_weights_loaded_later_must_be_the_prepared_ones(tmp_path: Path) -> None:
    cfg = _weights(tmp_path)
    recorded = {"name": "mobilenet_v2", "kind": "image", "feature_dim": 4, "description": FakeEncoder(cfg).describe()}
    good = PreparedEncoder(recorded | {"fingerprint": FakeEncoder(cfg).fingerprint}, "cpu", lambda: FakeEncoder(cfg))
    assert good.embed(np.zeros((3, 2))).shape == (3, 4) and good.loaded
    bad = PreparedEncoder(recorded | {"fingerprint": "0" * 64}, "cpu", lambda: FakeEncoder(cfg))
    with pytest.raises(EncoderError, match="not the ones this site prepared"):
        bad.embed(np.zeros((3, 2)))


def test_switched_off_nothing_is_read_or_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(prepared.SWITCH_ENV, "off")
    cfg, state, loads = _weights(tmp_path), _state(tmp_path), Loads(FakeEncoder)
    assert not any(isinstance(_encoder(cfg, state, loads), PreparedEncoder) for _ in range(2))
    planner = Loads(plan_dp)
    remembered_plan(
        state,
        planner,
        dict(
            num_samples=400,
            batch_size=32,
            local_epochs=1,
            rounds=3,
            target_epsilon=3.0,
            target_delta=1e-5,
            max_grad_norm=1.0,
            accountant="rdp",
        ),
    )
    assert loads.count == 2 and planner.count == 1 and not state.folder.exists()


def test_a_dp_plan_is_computed_once_per_site_and_recomputed_when_in_doubt(tmp_path: Path) -> None:
    state, planner = _state(tmp_path), Loads(plan_dp)
    args = dict(
        num_samples=400,
        batch_size=32,
        local_epochs=1,
        rounds=3,
        target_epsilon=3.0,
        target_delta=1e-5,
        max_grad_norm=1.0,
        accountant="rdp",
    )
    first = remembered_plan(state, planner, args)
    assert remembered_plan(state, planner, args) == first == plan_dp(**args) and planner.count == 1
    remembered_plan(
        state,
        planner,
        dict(
            num_samples=400,
            batch_size=32,
            local_epochs=1,
            rounds=3,
            target_epsilon=2.0,
            target_delta=1e-5,
            max_grad_norm=1.0,
            accountant="rdp",
        ),
    )  # another target ε
    assert planner.count == 2
    for record in state.folder.glob("plan-*.json"):  # a smaller σ would spend more ε than the site planned
        data = json.loads(record.read_text())
        data["value"]["noise_multiplier"] /= 10
        record.write_text(json.dumps(data))
    assert remembered_plan(state, planner, args) == first and planner.count == 3


# --- a deployed site, built as each ClientApp process builds it ---------------------------------------


def _deployed(tmp_path: Path) -> tuple[Context, RunConfig]:
    share = simulate_federation("digits", None, "iid", 3, 0.5, 0.2, 0.1, 32, 42).sites[0]
    home = tmp_path / "site"
    home.mkdir()
    images = np.concatenate([share.train.inputs, share.test.inputs])[:120, ..., 0]
    labels = np.concatenate([share.train.labels, share.test.labels])[:120]
    np.savez(home / "digits.npz", train_images=images, train_labels=labels)
    site = {
        "name": "hospital-a",
        "data_source": "npz",
        "data_path": "digits.npz",
        "device": "cpu",
        "state_dir": "state",
    }
    (home / "site.yaml").write_text(yaml.safe_dump(site))
    cfg = config_from_dict(
        {
            "output_dir": str(tmp_path / "run"),
            "cache_dir": str(tmp_path / "cache"),
            "device": "cpu",
            "backbone": {"image_size": 32},
            "data": {"source": "digits", "num_sites": 3},
            "train": {"rounds": 3, "local_epochs": 1, "protocol": "fedavg"},
            "privacy": {"target_delta": 1e-5, "feature_stats": False},
        }
    )
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"site-config": str(home / "site.yaml")},
        state=RecordDict(),
        run_config=to_run_config(cfg),
    )
    return context, cfg


def _process(context: Context, cfg: RunConfig) -> Site:
    """The site as a new ClientApp process builds it: nothing in memory from earlier messages."""
    return get_site(context, cfg, ProcessCache(max_entries=16, max_bytes=1 << 30))


def _train_message(site: Site, server_round: int, **extra: str) -> Message:
    torch.manual_seed(0)
    head = make_head(site.backbone.feature_dim, len(site.data.train.classes), 0)
    config = ConfigRecord(
        {
            "run-id": "0123abcd",
            "backbone-fingerprint": site.backbone.fingerprint,
            "app-version": "0.1.0",
            "server-round": server_round,
        }
        | extra
    )
    content = RecordDict({"arrays": head_to_arrays(head), "config": config})
    return to_site(
        content, message_id=f"m-{server_round}", group_id=str(server_round), src_node_id=1, dst_node_id=7, ttl=3600.0
    )


def test_a_prepared_site_trains_without_building_its_backbone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loads, planner = Loads(encoder_registry.load_encoder), Loads(plan_dp)
    monkeypatch.setattr(encoder_registry, "load_encoder", loads)
    monkeypatch.setattr(fedavg_local, "plan_dp", planner)
    context, cfg = _deployed(tmp_path)
    first = _process(context, cfg)
    assert loads.count == 1
    train_round.train(first, cfg, _train_message(first, 0, release=RECORD_COUNTS))  # round 0: its counts
    train_round.train(first, cfg, _train_message(first, 1))
    assert planner.count == 2  # round 0's plan needs no count; the rounds' rate follows the released one

    second = _process(context, cfg)  # the next round's process: features cached, identity recorded
    assert loads.count == 1 and isinstance(second.backbone, PreparedEncoder) and not second.backbone.loaded
    assert second.backbone.fingerprint == first.backbone.fingerprint
    assert torch.equal(second.train_x, first.train_x) and torch.equal(second.test_x, first.test_x)
    reply = train_round.train(second, cfg, _train_message(second, 2))
    assert planner.count == 2 and loads.count == 1
    assert reply["metrics"]["epsilon"] > 0 and "dp" in reply

    data = np.load(tmp_path / "site" / "digits.npz")  # the site's data changes: new features, same weights
    np.savez(
        tmp_path / "site" / "digits.npz", train_images=255 - data["train_images"], train_labels=data["train_labels"]
    )
    third = _process(context, cfg)
    assert loads.count == 2 and third.backbone.loaded  # built lazily, only to extract, and checked
    assert torch.allclose(
        third.train_x, extract(encoder_registry.KINDS["image"].load(cfg.backbone, "cpu"), third.data.train.inputs)
    )


def test_the_clientapp_imports_no_image_or_text_library() -> None:
    """A prepared site never builds its encoder, so its process does not pay for importing torchvision."""
    probe = (
        "import sys, fedtransfer.client.client_app; "
        "print(sorted({'torchvision', 'sentence_transformers'} & set(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=APP_ROOT, capture_output=True, text=True, timeout=300, check=True
    )
    assert done.stdout.strip() == "[]"
