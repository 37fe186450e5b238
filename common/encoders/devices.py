"""Which torch device a site or the server computes on: one rule, importable without any encoder.

A deployed ClientApp that finds its encoder prepared (client/prepared.py) never builds it, so
it must not import torchvision or the text packages only to learn its device.
"""

from __future__ import annotations

import torch
from fedtransfer.common.encoders.interface import EncoderError


def resolve_device(device: str) -> str:
    """'auto' picks the site's GPU when it has one; asking for cuda without one is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise EncoderError("device: cuda requested but no CUDA GPU is visible here; use device: auto or cpu")
    return device
