"""The exported adapted model: frozen backbone + trained head + preprocessing, in one file.

Load it with one call, `server.export.load_model(path)`, offline: the file carries the
backbone's weights (no hub download) and is read with `torch.load(weights_only=True)`,
so opening a model file never runs code from it.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from common import atomic
from common.backbones import REGISTRY, FrozenModule, ImageBackbone, Preprocess, state_dict_fingerprint
from common.config import BackboneConfig
from common.exchange import PREFIX
from common.head import make_head

FORMAT = "fedtransfer-model/1"


class AdaptedModel(nn.Module):
    """Float images in [0, 1], (N, C, H, W), any size, 1 or 3 channels -> class logits."""

    def __init__(self, preprocess: Preprocess, backbone: FrozenModule, head: nn.Module, classes: list[str]) -> None:
        super().__init__()
        self.preprocess, self.backbone, self.head = preprocess, backbone, head
        self.classes = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(self.preprocess(x)))

    @torch.inference_mode()
    def predict(self, images: np.ndarray) -> list[str]:
        """uint8 images (N, H, W, C) -> class names."""
        self.eval()
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
        return [self.classes[i] for i in self(x).argmax(1).tolist()]


def export_model(
    path: Path, cfg: BackboneConfig, backbone: ImageBackbone, head: nn.Module, hidden: int, classes: list[str]
) -> Path:
    payload = {
        "format": FORMAT,
        "backbone_config": asdict(cfg),
        "backbone_state": {k: v.cpu() for k, v in backbone.module.net.state_dict().items()},
        "backbone_fingerprint": backbone.fingerprint,
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "head_hidden": hidden,
        "head_state": {k: v.cpu() for k, v in head.state_dict().items()},
        "classes": list(classes),
    }
    atomic.torch_save(payload, path)
    return path


def load_model(path: str | Path) -> AdaptedModel:
    """Rebuild the adapted model from an exported file; refuses a file whose backbone was altered."""
    raw = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValueError(f"{path}: not a fedtransfer model file (format {FORMAT} expected)")
    cfg = BackboneConfig(**raw["backbone_config"])
    net = torchvision.models.get_model(cfg.name, weights=None)
    REGISTRY[cfg.name].strip(net)
    net.load_state_dict(raw["backbone_state"])
    if state_dict_fingerprint(net.state_dict()) != raw["backbone_fingerprint"]:
        raise ValueError(f"{path}: backbone weights do not match the recorded fingerprint; the file was altered")
    head_state = raw["head_state"]
    num_classes = len(raw["classes"])
    head = make_head(REGISTRY[cfg.name].feature_dim, num_classes, raw["head_hidden"])
    head.load_state_dict(head_state)
    preprocess = Preprocess(cfg.image_size, tuple(raw["mean"]), tuple(raw["std"]))
    return AdaptedModel(preprocess, FrozenModule(net), head.eval(), list(raw["classes"])).eval()


def head_from_arrays(arrays: dict[str, np.ndarray], feature_dim: int, num_classes: int, hidden: int) -> nn.Module:
    head = make_head(feature_dim, num_classes, hidden)
    head.load_state_dict({k.removeprefix(PREFIX): torch.from_numpy(np.array(v)) for k, v in arrays.items()})
    return head
