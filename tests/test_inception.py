"""Inception v3 in the backbone registry: a local file with its SHA-256, no auxiliary head, torchvision's input."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from fedtransfer.common.config.finetune import FinetuneConfig
from fedtransfer.common.config.run import BackboneConfig, ConfigError
from fedtransfer.common.encoders.image import IMAGENET_MEAN, IMAGENET_STD, BackboneError, load_backbone
from fedtransfer.common.encoders.registry import rebuild_encoder
from fedtransfer.common.model.finetune import cut_encoder, make_top
from torch.nn import functional as F

SIZE = 75  # the smallest input Inception v3 takes (299 px is its native size; the test keeps it small)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, torch.nn.Module]:
    """A state dict as torchvision's official file has it (auxiliary head included), random weights."""
    torch.manual_seed(0)
    net = torchvision.models.get_model("inception_v3", weights=None, aux_logits=True, init_weights=True).eval()
    for m in net.modules():  # statistics of random images: activations of a sane size, as trained weights have
        if isinstance(m, torch.nn.BatchNorm2d):
            m.train().momentum = None
    with torch.no_grad():
        net(torch.randn(16, 3, SIZE, SIZE))
    path = tmp_path_factory.mktemp("inception") / "inception_v3.pth"
    torch.save(net.state_dict(), path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest(), net.eval()


def test_loads_from_a_local_file_and_matches_torchvisions_network(weights: tuple) -> None:
    path, digest, reference = weights
    encoder = load_backbone(
        BackboneConfig(name="inception_v3", weights_file=str(path), weights_sha256=digest, image_size=SIZE)
    )
    assert not any(k.startswith("AuxLogits.") for k in encoder.state_dict())
    images = np.random.default_rng(1).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    features = encoder.embed(images)
    assert features.shape == (2, 2048)
    # torchvision's way for its pretrained weights: ImageNet normalisation, then transform_input inside the network
    reference.transform_input, reference.fc = True, torch.nn.Identity()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(features, reference(x), rtol=1e-3, atol=2e-3)  # float rounding of two routes
    rebuilt = rebuild_encoder(encoder.describe(), encoder.state_dict(), encoder.fingerprint)
    torch.testing.assert_close(rebuilt.embed(images), features)


def test_a_file_with_another_hash_is_refused(weights: tuple) -> None:
    path, _, _ = weights
    with pytest.raises(BackboneError, match="SHA-256"):
        load_backbone(
            BackboneConfig(name="inception_v3", weights_file=str(path), weights_sha256="0" * 64, image_size=SIZE)
        )


def test_its_last_block_fine_tunes(weights: tuple) -> None:
    path, digest, _ = weights
    encoder = load_backbone(
        BackboneConfig(name="inception_v3", weights_file=str(path), weights_sha256=digest, image_size=SIZE)
    )
    ft = FinetuneConfig(train="lora", blocks=1, lora_rank=2)
    cut = cut_encoder(encoder, ft)
    top = make_top(cut, 3, hidden=0, centred=False, ft=ft)
    images = np.random.default_rng(2).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    with torch.no_grad():
        torch.testing.assert_close(
            top.blocks(cut.embed(images).reshape(2, *cut.shape)), encoder.embed(images), rtol=1e-4, atol=1e-4
        )


def test_too_small_an_image_is_refused_by_the_config() -> None:
    with pytest.raises(ConfigError, match=r"backbone\.image_size"):
        BackboneConfig(name="inception_v3", image_size=64)
