"""The encoder interface: what DP, exchange, aggregation, the feature cache and export may know.

An encoder maps a site's raw inputs (images today; text or table rows later) to fixed-size
feature vectors and never changes during a run. Everything outside the encoder's own module
uses only `Encoder` below, so a new kind of encoder plugs in by adding a `CATALOG` entry
(common/config/catalog.py) and
an implementation registered in `common/encoders/registry.py`.

This module imports no torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch


class EncoderError(RuntimeError):
    """An encoder cannot be built as configured or rebuilt from a file (unknown, missing, altered)."""


class Encoder(Protocol):
    """A frozen feature extractor, as every part of fedtransfer outside its implementation sees it."""

    name: str  # registry name, e.g. "mobilenet_v2"
    kind: str  # "image" (later "text", "tabular"): picks how it is rebuilt
    feature_dim: int
    fingerprint: str  # SHA-256 of weights and describe(): sites compare it with the server's
    device: torch.device

    def embed(self, inputs: Any) -> torch.Tensor:
        """Raw inputs (N of them) to (N, feature_dim) float32 CPU features, without grad."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable kind, name and preprocessing settings; enters cache keys and model.pt."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights that, with describe(), rebuild this encoder (embedded in model.pt)."""
        ...


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes: how a weights file named in a config or a model file is identified."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def state_dict_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in name order."""
    import torch  # here, not at the top: the config imports this module and must stay torch-free

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def encoder_fingerprint(state: dict[str, torch.Tensor], description: dict[str, Any]) -> str:
    """SHA-256 of the weights and of everything else that changes the features (describe())."""
    canonical = json.dumps(description, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{state_dict_fingerprint(state)}|{canonical}".encode()).hexdigest()
