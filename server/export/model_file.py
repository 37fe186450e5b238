"""The exported adapted model: frozen encoder + trained head, in one file.

Load it with one call, `fedtransfer.server.export.model_file.load_model(path)`, offline: the file carries the
encoder's describe() and weights (no hub download) and is read with
`torch.load(weights_only=True)`, so opening a model file never runs code from it. Only the
`Encoder` interface is used here: any kind the registry can rebuild can be exported.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fedtransfer.common.config.finetune import FinetuneConfig
from fedtransfer.common.config.parse import ConfigError, build
from fedtransfer.common.data.sources import MAX_CLASSES
from fedtransfer.common.encoders.image import format1_description
from fedtransfer.common.encoders.interface import Encoder, EncoderError, encoder_fingerprint, state_dict_fingerprint
from fedtransfer.common.encoders.registry import rebuild_encoder
from fedtransfer.common.errors import InputError
from fedtransfer.common.model.finetune import CutEncoder, cut_encoder, make_top
from fedtransfer.common.model.head import is_centred
from fedtransfer.common.model.threshold import Threshold, decide
from fedtransfer.common.storage import atomic
from fedtransfer.common.wire.exchange import PREFIX
from torch import nn

FORMAT = "fedtransfer-model/2"
FORMAT_V1 = "fedtransfer-model/1"  # torchvision backbone fields at the top level; still readable


class ModelFileError(InputError):
    """A model file cannot be used: names the file and what is wrong with it."""


class AdaptedModel(nn.Module):
    """The encoder's raw inputs (uint8 images (N, H, W, C) for an image encoder) -> class logits.

    `threshold`: a binary model's decision threshold on the second class's probability (common/model/threshold.py),
    stored in the file; None (a file written before thresholds, or more than two classes) means argmax.
    """

    def __init__(
        self, encoder: Encoder, head: nn.Module, classes: list[str], threshold: Threshold | None = None
    ) -> None:
        super().__init__()
        self.encoder, self.head, self.classes, self.threshold = encoder, head, classes, threshold

    def forward(self, inputs: Any) -> torch.Tensor:
        return self.head(self.encoder.embed(inputs))

    @torch.inference_mode()
    def probabilities(self, inputs: Any) -> np.ndarray:
        """Raw inputs -> each class's probability, (N, classes) in the order of `classes`."""
        self.eval()
        return self(inputs).softmax(1).double().numpy()

    def decide(self, probs: np.ndarray) -> list[str]:
        """Class names from probabilities: the stored threshold for a binary model, else argmax."""
        value = None if self.threshold is None else self.threshold.value
        return [self.classes[i] for i in decide(probs, value).tolist()]

    def predict(self, inputs: Any) -> list[str]:
        """Raw inputs -> class names (a binary model's stored threshold applied)."""
        return self.decide(self.probabilities(inputs))


def export_model(
    path: Path,
    encoder: Encoder,
    head: nn.Module,
    *,
    hidden: int,
    classes: list[str],
    finetune: FinetuneConfig | None = None,
    threshold: Threshold | None = None,
) -> Path:
    """model.pt: the encoder (describe() and weights) and the head; a fine-tuned run adds what trained above the cut.

    A binary model also carries its decision `threshold` (value, rule and what it was chosen on), which
    `fedtransfer predict` applies: the threshold is part of the model a user deploys, not a flag to remember.

    `head_state` is the head's (or fine-tuned top's) exchanged tensors, the ones the run's audit
    log names; `finetune` (how the encoder was cut and what trained) rebuilds the rest from the encoder.
    """
    base = encoder.base if isinstance(encoder, CutEncoder) else encoder
    payload = {
        "format": FORMAT,
        "encoder": base.describe(),
        "encoder_state": {k: v.detach().cpu() for k, v in base.state_dict().items()},
        "encoder_fingerprint": base.fingerprint,
        "head_hidden": hidden,
        "head_state": {k: v.cpu() for k, v in head.state_dict().items()},
        "classes": list(classes),
    }
    if finetune is not None and finetune.active:
        payload["finetune"] = dataclasses.asdict(finetune)
    if threshold is not None and len(classes) == 2:
        payload["threshold"] = threshold.as_dict()
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
        finetune = build(FinetuneConfig, raw.get("finetune", {}), "finetune.")
        encoder = cut_encoder(rebuild_encoder(*_encoder_fields(raw)), finetune)
        head = make_top(encoder, len(classes), hidden=hidden, centred=is_centred(raw["head_state"]), ft=finetune).cpu()
        head.load_state_dict(raw["head_state"])
    except (EncoderError, ConfigError, RuntimeError, KeyError, TypeError, ValueError, AttributeError) as err:
        first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise ModelFileError(f"{path}: {first}") from None
    threshold = Threshold.from_dict(raw.get("threshold")) if len(classes) == 2 else None
    if "threshold" in raw and len(classes) == 2 and threshold is None:
        raise ModelFileError(f"{path}: its threshold must be a value in [0, 1]; export the model again")
    return AdaptedModel(encoder, head.eval(), [str(c) for c in classes], threshold).eval()


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


def head_from_arrays(
    arrays: dict[str, np.ndarray], encoder: Encoder, *, num_classes: int, hidden: int, finetune: FinetuneConfig
) -> nn.Module:
    """The head (or fine-tuned top above `encoder`'s cut) holding these exchanged tensors (wire names)."""
    head = make_top(encoder, num_classes, hidden=hidden, centred=is_centred(arrays), ft=finetune)
    head.load_state_dict({k.removeprefix(PREFIX): torch.from_numpy(np.array(v)) for k, v in arrays.items()})
    return head
