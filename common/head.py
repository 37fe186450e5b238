"""The classification head: the only part of the model that trains and leaves a site."""

from __future__ import annotations

import torch
from torch import nn

FEATURE_SCALE = 8.0


class L2Normalize(nn.Module):
    """Scale each feature vector to unit length (times `scale`).

    A per-sample transform, so it costs no privacy; it bounds every per-sample gradient
    of the first layer, so DP clipping throws away far less signal.
    """

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, dim=1) * self.scale


def make_head(feature_dim: int, num_classes: int, hidden: int = 0) -> nn.Sequential:
    """Linear probe by default; one hidden ReLU layer when `hidden` > 0.

    No BatchNorm here: Opacus' per-sample gradients need layers without batch statistics.
    """
    norm = L2Normalize(FEATURE_SCALE)
    if hidden:
        return nn.Sequential(norm, nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
    return nn.Sequential(norm, nn.Linear(feature_dim, num_classes))


def evaluate_head(head: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy)."""
    device = next(head.parameters()).device
    head.eval()
    with torch.no_grad():
        logits = head(features.to(device))
        loss = nn.functional.cross_entropy(logits, labels.to(device)).item()
        acc = (logits.argmax(1).cpu() == labels).float().mean().item()
    return loss, acc
