"""Build an encoder from the run config, or rebuild one from a model file: one table, keyed by kind.

A new kind of encoder (text, tabular) adds its `CATALOG` entries in common/encoders/interface.py and
one `EncoderKind` row here; sites, the server, the feature cache and export are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from fedtransfer.common.config.catalog import CATALOG
from fedtransfer.common.config.run import BackboneConfig
from fedtransfer.common.encoders.devices import resolve_device as resolve_device  # its home; imported from here too
from fedtransfer.common.encoders.image import load_backbone, rebuild_backbone
from fedtransfer.common.encoders.interface import Encoder, EncoderError
from fedtransfer.common.encoders.tabular import load_tabular, rebuild_tabular
from fedtransfer.common.encoders.text import load_text_encoder, rebuild_text_encoder


@dataclass(frozen=True)
class EncoderKind:
    """How one kind of encoder is built from the config and rebuilt from (describe(), state_dict())."""

    load: Callable[[BackboneConfig, str], Encoder]
    rebuild: Callable[[Mapping[str, Any], Mapping[str, torch.Tensor], str], Encoder]


KINDS: dict[str, EncoderKind] = {
    "image": EncoderKind(load_backbone, rebuild_backbone),
    "tabular": EncoderKind(load_tabular, rebuild_tabular),
    "text": EncoderKind(load_text_encoder, rebuild_text_encoder),
}


def load_encoder(cfg: BackboneConfig, device: str) -> Encoder:
    """The configured encoder, frozen, from offline weights only (device as resolve_device gives it)."""
    return KINDS[CATALOG[cfg.name].kind].load(cfg, device)


def rebuild_encoder(
    description: Mapping[str, Any], state: Mapping[str, torch.Tensor], fingerprint: str, device: str = "cpu"
) -> Encoder:
    """An encoder from the describe() and state_dict() it was saved with; refuses altered weights.

    `fingerprint` is the one recorded next to them: a rebuilt encoder whose weights or
    settings differ from what was saved is an error, never a silently different model.
    """
    kind = description.get("kind")
    if kind not in KINDS:
        raise EncoderError(f"encoder kind {str(kind)[:40]!r} is not known here (known: {', '.join(KINDS)})")
    encoder = KINDS[kind].rebuild(description, state, device)
    if encoder.fingerprint != fingerprint:
        raise EncoderError("encoder weights or settings do not match the recorded fingerprint; the file was altered")
    return encoder
