"""Activations at a fine-tuning cut point: computed once per sample, kept on disk, read memory-mapped.

Activations below the last blocks are far larger than final features (MobileNetV2 at 224 px,
cut below its last block: 320 x 7 x 7 values per sample, against 1,280 features), so they are
stored as float16 `.npy` files, written batch by batch into a memory map (the whole set is
never in memory while it is computed) and read back memory-mapped: training touches only the
pages of the samples each batch draws. The folder's cut files are bounded in total size; the
least recently used go first. A torn or foreign file is recomputed, never trusted.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from fedtransfer.common.encoders.interface import EncoderError

SUFFIX = ".cut.npy"
DTYPE = np.float16  # half the bytes of float32; activations of these networks sit far inside its range


def cached_activations(
    path: Path | None,
    *,
    count: int,
    dim: int,
    compute: Callable[[int, int], torch.Tensor],
    max_bytes: int,
    batch_size: int = 256,
) -> tuple[torch.Tensor, bool]:
    """(count, dim) float16 activations for `path` (memory-mapped), from disk or `compute(start, stop)`: (x, now)."""
    if path is not None and (found := _read(path, count, dim)) is not None:
        with contextlib.suppress(OSError):  # a read-only cache folder is still a cache
            os.utime(path)  # recently used: kept longest
        return found, False
    if path is None:
        out = torch.empty(count, dim, dtype=torch.float16)
        for start in range(0, count, batch_size):
            out[start : start + batch_size] = _half(compute(start, min(start + batch_size, count)))
        return out, True
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        target = np.lib.format.open_memmap(tmp, mode="w+", dtype=DTYPE, shape=(count, dim))
        for start in range(0, count, batch_size):
            target[start : start + batch_size] = _half(compute(start, min(start + batch_size, count))).numpy()
        target.flush()
        del target
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    evict(path.parent, max_bytes, keep=path)
    found = _read(path, count, dim)
    if found is None:  # the bound is smaller than this one file: it was written, and is used from memory
        raise EncoderError(
            f"finetune.cache_max_gb: the cut activations of {count} samples ({count * dim * 2:,} "
            f"bytes) do not fit the bound of {max_bytes:,} bytes; raise it"
        )
    return found, True


def _half(x: torch.Tensor) -> torch.Tensor:
    half = x.detach().cpu().to(torch.float16)
    if not torch.isfinite(half).all():
        raise EncoderError("cut activations exceed float16's range (65,504); this encoder cannot be cut here")
    return half


def _read(path: Path, count: int, dim: int) -> torch.Tensor | None:
    try:
        array = np.load(path, mmap_mode="c")  # copy-on-write: shared pages, never written back
    except (OSError, ValueError, EOFError):
        return None
    if array.dtype != DTYPE or array.shape != (count, dim):
        return None
    return torch.from_numpy(array)


def evict(folder: Path, max_bytes: int, keep: Path | None = None) -> list[Path]:
    """Remove the least recently used cut files of `folder` until they total at most `max_bytes`; `keep` stays."""
    files = []
    for p in folder.glob(f"*{SUFFIX}"):
        try:
            stat = p.stat()
        except FileNotFoundError:  # another process evicted it meanwhile
            continue
        files.append((stat.st_mtime, stat.st_size, p))
    total, removed = sum(size for _, size, _ in files), []
    for _, size, p in sorted(files):
        if total <= max_bytes:
            break
        if p == keep:
            continue
        p.unlink(missing_ok=True)
        total -= size
        removed.append(p)
    if total > max_bytes and keep is not None:
        keep.unlink(missing_ok=True)
    return removed
