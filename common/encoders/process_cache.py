"""What one process keeps in memory across rounds, in one bounded, explicit object.

A simulation actor plays many sites and a SuperNode answers many rounds; rebuilding the
encoder, re-splitting the data pool and re-extracting features for every message would
dominate a round. `ProcessCache` keeps those results under these rules:

- Keys are tuples whose first item names what is cached ("encoder", "federation", "site")
  and whose other items are everything the value depends on: equal keys, equal values.
- Values are immutable (frozen dataclasses, encoders that never change), since every
  later round shares them.
- Least recently used entries are dropped once there are more than `max_entries` of them
  or their sizes add up to more than `max_bytes`. The entry just built is always kept,
  so one value larger than the bound is still built once per use, never in a loop.
- A size is the bytes of the arrays and tensors a value holds (`nbytes`); an array shared
  by two entries counts in both, so the bound errs on the side of keeping less.
- A failed build caches nothing: the next round tries again.

The instance a process uses is created in one place (client/site.py) and passed in; this
module itself holds no state.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")


class ProcessCache:
    """An LRU map bounded by entry count and by bytes; see the module docstring for the rules."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        if max_entries < 1 or max_bytes < 0:
            raise ValueError("a process cache needs max_entries >= 1 and max_bytes >= 0")
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()  # reentrant: building a site gets its encoder from the same cache

    def get(self, key: Hashable, build: Callable[[], T], size: Callable[[T], int] | None = None) -> T:
        """The value under `key`, building (and keeping) it with `build()` when absent.

        `size` gives the value's bytes; by default `nbytes(value)`.
        """
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key][0]  # type: ignore[return-value]
            value = build()
            cost = (size or nbytes)(value)
            self._entries[key] = (value, cost)
            self._bytes += cost
            self._evict(keep=key)
            return value

    def _evict(self, keep: Hashable) -> None:
        while len(self._entries) > 1 and (len(self._entries) > self.max_entries or self._bytes > self.max_bytes):
            oldest = next(iter(self._entries))
            if oldest == keep:  # only the newest is left over the bound: keep it
                break
            self._bytes -= self._entries.pop(oldest)[1]

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    @property
    def bytes(self) -> int:
        """The sizes of the kept values added up (what max_bytes bounds)."""
        return self._bytes


def nbytes(value: object) -> int:
    """Bytes of the arrays, tensors and strings in `value`, through dataclasses, mappings and sequences.

    Other objects count as 0: an object such as an encoder is sized by whoever caches it.
    """
    if isinstance(value, torch.Tensor):
        return value.nelement() * value.element_size()
    if isinstance(value, np.ndarray):
        return int(value.nbytes) + (sum(nbytes(v) for v in value.reshape(-1)) if value.dtype == object else 0)
    if isinstance(value, str | bytes):
        return len(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(nbytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, Mapping):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(nbytes(v) for v in value)
    return 0
