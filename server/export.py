"""The exported adapted model: frozen encoder + trained head, in one file.

Load it with one call, `server.export.load_model(path)`, offline: the file carries the
encoder's describe() and weights (no hub download) and is read with
`torch.load(weights_only=True)`, so opening a model file never runs code from it. Only the
`Encoder` interface is used here: any kind the registry can rebuild can be exported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common import atomic
from common.backbones import format1_description
from common.data import MAX_CLASSES
from common.encoder_registry import rebuild_encoder
from common.encoders import Encoder, EncoderError, encoder_fingerprint, state_dict_fingerprint
from common.exchange import PREFIX
from common.head import is_centred, make_head

FORMAT = "fedtransfer-model/2"
FORMAT_V1 = "fedtransfer-model/1"  # torchvision backbone fields at the top level; still readable


class ModelFileError(ValueError):
    """A model file cannot be used: names the file and what is wrong with it."""


class AdaptedModel(nn.Module):
    """The encoder's raw inputs (uint8 images (N, H, W, C) for an image encoder) -> class logits."""

    def __init__(self, encoder: Encoder, head: nn.Module, classes: list[str]) -> None:
        super().__init__()
        self.encoder, self.head, self.classes = encoder, head, classes

    def forward(self, inputs: Any) -> torch.Tensor:
        return self.head(self.encoder.embed(inputs))

    @torch.inference_mode()
    def predict(self, inputs: Any) -> list[str]:
        """Raw inputs -> class names."""
        self.eval()
        return [self.classes[i] for i in self(inputs).argmax(1).tolist()]


def export_model(path: Path, encoder: Encoder, head: nn.Module, hidden: int, classes: list[str]) -> Path:
    payload = {
        "format": FORMAT,
        "encoder": encoder.describe(),
        "encoder_state": {k: v.detach().cpu() for k, v in encoder.state_dict().items()},
        "encoder_fingerprint": encoder.fingerprint,
        "head_hidden": hidden,
        "head_state": {k: v.cpu() for k, v in head.state_dict().items()},
        "classes": list(classes),
    }
    atomic.torch_save(payload, path)
    return path


def load_model(path: str | Path) -> AdaptedModel:
    """Rebuild the adapted model from an exported file; refuses a file whose encoder was altered."""
    raw = _read(Path(path))
    classes, hidden = raw.get("classes"), raw.get("head_hidden")
    if not isinstance(classes, list) or not 1 <= len(classes) <= MAX_CLASSES:
        raise ModelFileError(f"{path}: needs a list of 1..{MAX_CLASSES} class names")
    if type(hidden) is not int or not 0 <= hidden <= 65_536:
        raise ModelFileError(f"{path}: head_hidden must be an integer in 0..65536")
    try:
        encoder = rebuild_encoder(*_encoder_fields(raw))
        head = make_head(encoder.feature_dim, len(classes), hidden, centred=is_centred(raw["head_state"]))
        head.load_state_dict(raw["head_state"])
    except (EncoderError, RuntimeError, KeyError, TypeError, ValueError, AttributeError) as err:
        first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise ModelFileError(f"{path}: {first}") from None
    return AdaptedModel(encoder, head.eval(), [str(c) for c in classes]).eval()


def _read(path: Path) -> dict[str, Any]:
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch's unpickler raises IndexError, KeyError... on a torn file
        raise ModelFileError(f"{path}: cannot read a model file ({type(err).__name__})") from None
    if not isinstance(raw, dict) or raw.get("format") not in (FORMAT, FORMAT_V1):
        raise ModelFileError(f"{path}: not a fedtransfer model file (format {FORMAT} expected)")
    return raw


def _encoder_fields(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """(describe(), state_dict(), fingerprint) as stored; a format-1 file is read as the image encoder it holds."""
    if raw["format"] == FORMAT:
        return raw["encoder"], raw["encoder_state"], raw["encoder_fingerprint"]
    # format 1 recorded the fingerprint of the weights alone: check it, then fingerprint as format 2 does
    state = raw["backbone_state"]
    if state_dict_fingerprint(state) != raw["backbone_fingerprint"]:
        raise EncoderError("encoder weights do not match the recorded fingerprint; the file was altered")
    description = format1_description(raw["backbone_config"], raw["mean"], raw["std"])
    return description, state, encoder_fingerprint(state, description)


def head_from_arrays(arrays: dict[str, np.ndarray], feature_dim: int, num_classes: int, hidden: int) -> nn.Module:
    head = make_head(feature_dim, num_classes, hidden, centred=is_centred(arrays))
    head.load_state_dict({k.removeprefix(PREFIX): torch.from_numpy(np.array(v)) for k, v in arrays.items()})
    return head
