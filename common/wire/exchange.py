"""What travels between server and sites: head tensors, named and checked.

Both directions go through here, so "only head tensors leave a site" is one function to
audit: `head_to_arrays` is the only way a site builds what it sends.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

PREFIX = "head."
MASKED_WEIGHT = "secagg.weight"  # SecAgg+ sends the (masked) example count before the head's tensors

Spec = dict[str, tuple[tuple[int, ...], str]]  # tensor name -> (shape, dtype)


def head_to_arrays(head: nn.Module) -> ArrayRecord:
    state = {PREFIX + k: v.detach().cpu() for k, v in head.state_dict().items()}
    return ArrayRecord(state)


def gradient_to_arrays(head: nn.Module, sums: dict[str, torch.Tensor]) -> ArrayRecord:
    """A fedsgd site's noisy gradient sum, named, shaped and typed exactly like the head's tensors.

    The only other thing a site sends in place of a head: the server screens it against the
    same spec (`head_spec`), so nothing but head-shaped tensors can leave this way either.
    """
    state = head.state_dict()
    if set(sums) != set(state):
        raise ValueError(f"gradient names {sorted(sums)} differ from the head's {sorted(state)}")
    return ArrayRecord({PREFIX + k: sums[k].detach().cpu().to(v.dtype).reshape(v.shape) for k, v in state.items()})


def head_spec(head: nn.Module) -> Spec:
    return {PREFIX + k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in head.state_dict().items()}


def arrays_to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: arr.numpy() for name, arr in arrays.items()}


def wire_bytes(arrays: ArrayRecord) -> int:
    """Bytes of the serialized tensors as they travel (numpy payload with its header)."""
    return sum(len(arr.data) for arr in arrays.values())


def check_arrays(
    arrays: ArrayRecord,
    spec: Spec,
    max_norm: float | None = None,
    reference: dict[str, np.ndarray] | None = None,
) -> str | None:
    """Why these arrays are not a valid head for `spec`, or None when they are.

    With `max_norm`, the L2 norm of (arrays - reference) must not exceed it: sites send
    weights, so the update is their distance from the head the round started from.
    """
    names = set(arrays.keys())
    if names != set(spec):
        missing, extra = sorted(set(spec) - names), sorted(names - set(spec))
        return f"tensor names differ from the head: missing {missing}, unexpected {extra}"
    total = 0.0
    for name, (shape, dtype) in spec.items():
        arr = arrays[name]
        if tuple(arr.shape) != shape or arr.dtype != dtype:
            return f"{name} is {arr.dtype}{list(arr.shape)}, the head needs {dtype}{list(shape)}"
        values = arr.numpy()
        if not np.all(np.isfinite(values)):
            return f"{name} holds NaN or Inf values"
        if reference is not None:
            values = values.astype(np.float64) - reference[name]
        total += float(np.sum(np.square(values, dtype=np.float64)))
    norm = math.sqrt(total)
    if max_norm is not None and norm > max_norm:
        return f"update L2 norm {norm:.4g} exceeds train.max_update_norm = {max_norm:.4g}"
    return None


def masked_arrays(vectors: list[np.ndarray], head_names: list[str]) -> dict[str, np.ndarray]:
    """A site's SecAgg+ vectors, named: the masked weight, then the masked head tensors in order."""
    if len(vectors) != len(head_names) + 1:
        raise ValueError(f"{len(vectors)} masked vectors for a head of {len(head_names)} tensors (plus the weight)")
    return dict(zip([MASKED_WEIGHT, *head_names], vectors, strict=True))


def load_head(head: nn.Module, arrays: ArrayRecord) -> None:
    """Load arrays into the head after checking them; a mismatch is a ValueError with the reason."""
    reason = check_arrays(arrays, head_spec(head))
    if reason is not None:
        raise ValueError(f"head update rejected: {reason}")
    state = {k.removeprefix(PREFIX): torch.from_numpy(v.copy()) for k, v in arrays_to_numpy(arrays).items()}
    head.load_state_dict(state)
