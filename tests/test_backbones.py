"""Image encoders: registry, offline-only weights, hash checks, fingerprints, frozen BatchNorm, model files."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from fedtransfer.common.config.catalog import CATALOG
from fedtransfer.common.config.run import BackboneConfig
from fedtransfer.common.data.sources import MAX_CLASSES, Samples
from fedtransfer.common.encoders.feature_cache import cached_features
from fedtransfer.common.encoders.image import (
    IMAGE_BACKBONES,
    BackboneError,
    ImageBackbone,
    hub_checkpoint_path,
    load_backbone,
)
from fedtransfer.common.encoders.interface import (
    EncoderError,
    encoder_fingerprint,
    file_sha256,
    state_dict_fingerprint,
)
from fedtransfer.common.encoders.registry import rebuild_encoder
from fedtransfer.common.model.head import make_head
from fedtransfer.server.export.model_file import FORMAT_V1, ModelFileError, export_model, load_model


@pytest.fixture(scope="module")
def backbone() -> ImageBackbone:
    return load_backbone(BackboneConfig(image_size=32))


@pytest.fixture
def empty_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty torch hub cache; any network download (torch.hub fetches files there) fails the test."""

    def no_download(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a backbone load attempted a network download")

    hub = tmp_path / "hub"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    previous = torch.hub._hub_dir
    torch.hub.set_dir(str(hub))
    try:
        yield hub
    finally:
        torch.hub._hub_dir = previous


def _batch(seed: int, n: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def test_registry_has_the_documented_backbones() -> None:
    expected = {"mobilenet_v2", "mobilenet_v3_small", "resnet18", "resnet50", "vgg16", "efficientnet_b0"}
    assert expected <= set(IMAGE_BACKBONES)


@pytest.mark.parametrize("name", sorted(IMAGE_BACKBONES))
def test_every_backbone_maps_images_to_features(name: str) -> None:
    net = load_backbone(BackboneConfig(name=name, weights="none", image_size=max(32, CATALOG[name].min_image_size)))
    features = net.embed(_batch(0))
    assert features.shape == (2, CATALOG[name].feature_dim)
    assert net.feature_dim == CATALOG[name].feature_dim
    assert features.dtype == torch.float32
    assert torch.isfinite(features).all()


def test_grayscale_images_are_accepted(backbone: ImageBackbone) -> None:
    gray = _batch(1)[..., :1]
    assert backbone.embed(gray).shape == (2, backbone.feature_dim)


def test_missing_weights_say_where_to_put_them_and_never_download(empty_hub: Path) -> None:
    cfg = BackboneConfig(name="resnet18", weights="IMAGENET1K_V1", image_size=32)
    with pytest.raises(BackboneError) as info:
        load_backbone(cfg)
    message = str(info.value)
    target = hub_checkpoint_path(torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
    assert target.parent == empty_hub / "checkpoints"
    assert target.name in message
    assert str(target.parent) in message
    assert "weights_file" in message
    assert not target.exists()


def test_unknown_weights_name_lists_choices() -> None:
    with pytest.raises(BackboneError, match=r"IMAGENET1K_V1.*none"):
        load_backbone(BackboneConfig(name="resnet18", weights="IMAGENET42", image_size=32))


def test_packaged_mobilenet_weights_load_offline(empty_hub: Path, backbone: ImageBackbone) -> None:
    fresh = load_backbone(BackboneConfig(image_size=32))
    assert fresh.fingerprint == backbone.fingerprint
    assert (empty_hub / "checkpoints" / "mobilenet_v2-b0353104.pth").is_file()


def test_weights_file_with_wrong_hash_is_refused_naming_both(tmp_path: Path) -> None:
    path = tmp_path / "weights.pth"
    path.write_bytes(b"not the weights you expect")
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    expected = "0" * 64
    cfg = BackboneConfig(weights_file=str(path), weights_sha256=expected, image_size=32)
    with pytest.raises(BackboneError) as info:
        load_backbone(cfg)
    assert actual in str(info.value)
    assert expected in str(info.value)


def test_weights_file_that_is_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.pth"
    torch.save({"layer.weight": torch.zeros(2)}, path)
    cfg = BackboneConfig(weights_file=str(path), weights_sha256=file_sha256(path), image_size=32)
    with pytest.raises(BackboneError, match="not a mobilenet_v2 state dict"):
        load_backbone(cfg)


def test_local_weights_file_matches_hub_fingerprint(backbone: ImageBackbone) -> None:
    path = hub_checkpoint_path(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1)
    cfg = BackboneConfig(weights_file=str(path), weights_sha256=file_sha256(path).upper(), image_size=32)
    local = load_backbone(cfg)
    assert local.fingerprint == backbone.fingerprint
    batch = _batch(2)
    assert torch.equal(local.embed(batch), backbone.embed(batch))


def test_fingerprint_covers_every_weight_and_the_preprocessing(backbone: ImageBackbone) -> None:
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    assert encoder_fingerprint(state, backbone.describe()) == backbone.fingerprint
    assert encoder_fingerprint(state, backbone.describe() | {"image_size": 64}) != backbone.fingerprint
    name = next(k for k, v in state.items() if v.is_floating_point() and k.endswith("weight"))
    state[name].view(-1)[0] += 1e-3
    assert encoder_fingerprint(state, backbone.describe()) != backbone.fingerprint
    assert state_dict_fingerprint({"a": torch.zeros(2, 3)}) != state_dict_fingerprint({"a": torch.zeros(3, 2)})


def test_batchnorm_stays_frozen(backbone: ImageBackbone) -> None:
    before = {k: v.clone() for k, v in backbone.module.state_dict().items()}
    assert any(k.endswith("running_mean") for k in before)
    assert any(k.endswith("num_batches_tracked") for k in before)
    images = _batch(3, n=6)
    samples = Samples(images, np.zeros(6, dtype=np.int64), ("a",))
    _, computed = cached_features(backbone, samples, None)
    assert computed
    backbone.module.train()
    backbone.embed(_batch(4, n=4))
    after = backbone.module.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed"
    assert backbone.module.training is False
    assert not any(m.training for m in backbone.module.modules())
    assert not any(p.requires_grad for p in backbone.module.parameters())
    assert encoder_fingerprint(backbone.state_dict(), backbone.describe()) == backbone.fingerprint


def test_features_do_not_depend_on_batch_companions(backbone: ImageBackbone) -> None:
    images = _batch(5, n=3)
    together = backbone.embed(images)
    alone = backbone.embed(images[:1])
    torch.testing.assert_close(together[:1], alone, rtol=1e-4, atol=1e-5)


def test_description_is_json_and_names_kind_and_preprocessing(backbone: ImageBackbone) -> None:
    description = json.loads(json.dumps(backbone.describe()))
    assert description == backbone.describe()
    assert description["kind"] == backbone.kind == "image"
    assert description["name"] == backbone.name == "mobilenet_v2"
    assert description["image_size"] == 32
    assert len(description["mean"]) == len(description["std"]) == 3


def test_rebuilt_encoder_embeds_identically(backbone: ImageBackbone) -> None:
    rebuilt = rebuild_encoder(backbone.describe(), backbone.state_dict(), backbone.fingerprint)
    assert rebuilt.fingerprint == backbone.fingerprint
    batch = _batch(6)
    assert torch.equal(rebuilt.embed(batch), backbone.embed(batch))


def test_rebuilding_refuses_altered_weights_and_unknown_kinds(backbone: ImageBackbone) -> None:
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name].view(-1)[0] += 1.0
    with pytest.raises(EncoderError, match="fingerprint"):
        rebuild_encoder(backbone.describe(), state, backbone.fingerprint)
    with pytest.raises(EncoderError, match="kind 'audio'"):
        rebuild_encoder(backbone.describe() | {"kind": "audio"}, state, backbone.fingerprint)
    with pytest.raises(EncoderError, match="not a mobilenet_v2 state dict"):
        rebuild_encoder(backbone.describe(), {"x": torch.zeros(1)}, backbone.fingerprint)


def _exported(backbone: ImageBackbone, path: Path, classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    head = make_head(backbone.feature_dim, classes, 0)
    export_model(path, backbone, head, hidden=0, classes=[f"c{i}" for i in range(classes)])
    return head


def test_model_file_predicts_like_encoder_plus_head(backbone: ImageBackbone, tmp_path: Path) -> None:
    head = _exported(backbone, tmp_path / "model.pt")
    model = load_model(tmp_path / "model.pt")
    batch = _batch(7, n=5)
    expected = head(backbone.embed(batch)).argmax(1).tolist()
    assert model.predict(batch) == [f"c{i}" for i in expected]
    assert model.encoder.describe() == backbone.describe()


def test_format_1_model_files_still_load(backbone: ImageBackbone, tmp_path: Path) -> None:
    head = _exported(backbone, tmp_path / "model.pt")
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    legacy = {
        "format": FORMAT_V1,
        "backbone_config": {
            "name": "mobilenet_v2",
            "weights": "IMAGENET1K_V1",
            "weights_file": None,
            "weights_sha256": None,
            "image_size": 32,
        },
        "backbone_state": state,
        "backbone_fingerprint": state_dict_fingerprint(state),
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "head_hidden": 0,
        "head_state": head.state_dict(),
        "classes": ["c0", "c1", "c2"],
    }
    torch.save(legacy, tmp_path / "old.pt")
    batch = _batch(8, n=4)
    assert load_model(tmp_path / "old.pt").predict(batch) == load_model(tmp_path / "model.pt").predict(batch)
    legacy["backbone_fingerprint"] = "0" * 64
    torch.save(legacy, tmp_path / "altered.pt")
    with pytest.raises(ModelFileError, match=r"altered\.pt: .*fingerprint"):
        load_model(tmp_path / "altered.pt")


def test_model_file_errors_name_the_file(backbone: ImageBackbone, tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    _exported(backbone, path)
    raw = torch.load(path, weights_only=True)
    raw["encoder_state"][next(iter(raw["encoder_state"]))].view(-1)[0] += 1.0
    torch.save(raw, tmp_path / "altered.pt")
    with pytest.raises(ModelFileError, match=r"altered\.pt: .*the file was altered"):
        load_model(tmp_path / "altered.pt")
    raw = torch.load(path, weights_only=True) | {"classes": [str(i) for i in range(MAX_CLASSES + 1)]}
    torch.save(raw, tmp_path / "classes.pt")
    with pytest.raises(ModelFileError, match=rf"classes\.pt: .*1\.\.{MAX_CLASSES} class names"):
        load_model(tmp_path / "classes.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match=r"junk\.pt: cannot read"):
        load_model(tmp_path / "junk.pt")


def test_config_and_encoder_names_load_without_torch() -> None:
    code = (
        "import sys; from fedtransfer.common.config.run import RunConfig; RunConfig(); "
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
