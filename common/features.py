"""Backbone features, computed once per sample per run and cached on disk.

The backbone is frozen, so a sample's features never change during a run: every round
trains the head on these cached features instead of re-running the backbone. The cache
key binds the backbone fingerprint, the data fingerprint and the preprocessing, so a
different model, data set or image size can never reuse stale features.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from common import atomic
from common.backbones import Backbone
from common.data import Samples

_MEMORY: dict[str, torch.Tensor] = {}  # per process: a simulation actor serves many rounds


def cache_key(backbone: Backbone, samples: Samples) -> str:
    parts = f"{backbone.name}|{backbone.fingerprint}|{backbone.preprocessing}|{samples.fingerprint()}"
    return hashlib.sha256(parts.encode()).hexdigest()


def extract(backbone: Backbone, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Run the backbone over all images in batches: (N, feature_dim) float32."""
    chunks = [backbone.embed(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return torch.cat(chunks) if chunks else torch.empty(0, backbone.feature_dim)


def cached_features(backbone: Backbone, samples: Samples, cache_dir: Path | None) -> tuple[torch.Tensor, bool]:
    """Features for `samples`, from memory, disk or the backbone: (features, computed_now)."""
    key = cache_key(backbone, samples)
    if key in _MEMORY:
        return _MEMORY[key], False
    path = cache_dir / f"{key}.pt" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            feats = torch.load(path, map_location="cpu", weights_only=True)
            if feats.shape == (len(samples), backbone.feature_dim):
                _MEMORY[key] = feats
                return feats, False
        except (RuntimeError, EOFError, OSError):
            pass  # a torn or foreign cache file is recomputed, never trusted
    feats = extract(backbone, samples.images)
    _MEMORY[key] = feats
    if path is not None:
        atomic.torch_save(feats, path)
    return feats, True
