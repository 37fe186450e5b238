"""Encoder features, computed once per sample and cached on disk.

The encoder is frozen, so a sample's features never change during a run: every round
trains the head on these cached features instead of re-running the encoder. The cache
key binds the encoder's fingerprint and describe() (kind, name, preprocessing) to the
samples' fingerprint, so a different model, data set or input size never reuses stale
features. Keeping features in memory across rounds is the caller's process cache's job
(client/site.py), not this module's: here there is no process-wide state.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from fedtransfer.common.data.sources import Samples
from fedtransfer.common.encoders import cut_cache
from fedtransfer.common.encoders.interface import Encoder
from fedtransfer.common.progress import Progress
from fedtransfer.common.storage import atomic


def cache_key(encoder: Encoder, samples: Samples) -> str:
    description = json.dumps(encoder.describe(), sort_keys=True, separators=(",", ":"))
    parts = f"{encoder.fingerprint}|{description}|{samples.fingerprint()}"
    return hashlib.sha256(parts.encode()).hexdigest()


def extract(encoder: Encoder, inputs: Any, batch_size: int = 256) -> torch.Tensor:
    """Run the encoder over all inputs in batches: (N, feature_dim) float32; progress on stderr."""
    chunks = []
    with Progress(f"features ({encoder.name})", len(inputs), "samples") as progress:
        for i in range(0, len(inputs), batch_size):
            chunks.append(encoder.embed(inputs[i : i + batch_size]))
            progress.step(len(chunks[-1]))
        progress.stage_done(f"{len(inputs)} samples")
    return torch.cat(chunks) if chunks else torch.empty(0, encoder.feature_dim)


def cached_features(encoder: Encoder, samples: Samples, cache_dir: Path | None) -> tuple[torch.Tensor, bool]:
    """Features for `samples`, from the disk cache or the encoder: (features, computed_now).

    An encoder cut for fine-tuning (its describe() names the cut) gives activations instead,
    which common/encoders/cut_cache.py keeps as bounded, memory-mapped float16 files.
    """
    if "cut" in encoder.describe():
        where = cache_dir / f"{cache_key(encoder, samples)}{cut_cache.SUFFIX}" if cache_dir is not None else None
        with Progress(f"cut activations ({encoder.name})", len(samples), "samples") as progress:

            def compute(start: int, stop: int) -> torch.Tensor:
                out = encoder.embed(samples.inputs[start:stop])
                progress.step(stop - start)
                return out

            return cut_cache.cached_activations(
                where,
                count=len(samples),
                dim=encoder.feature_dim,
                compute=compute,
                max_bytes=int(getattr(encoder, "cache_max_bytes", 1 << 40)),
            )
    path = cache_dir / f"{cache_key(encoder, samples)}.pt" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            feats = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(feats, torch.Tensor) and feats.shape == (len(samples), encoder.feature_dim):
                return feats, False
        except Exception:  # torch's unpickler raises IndexError, KeyError... on a torn file
            pass  # a torn or foreign cache file is recomputed, never trusted
    feats = extract(encoder, samples.inputs)
    if path is not None:
        atomic.torch_save(feats, path)
    return feats, True
