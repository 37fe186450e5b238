"""What the federation knows that a site does not: pseudo-records of the classes a site has (almost) never seen.

Why: a site chooses its final model (client/site_model/final.py) on a validation split of its own records. Under
label skew those records hold only the site's own classes, so validation alone always prefers a model as sharp
as going alone, which forgets every class the site has too few records of (issue 29: the final model was 1-4
points better than alone at home but 20-40 points worse than the global model on the other sites' data). The
site has no records of those classes, and the federation sends none; but the global model itself says what
they look like. Here each of the site's own records is moved, by gradient steps on its features, until the
global model gives a rare class a probability of at least CONFIDENCE: a record the global model is sure of.
A candidate that still answers that class on such records keeps what the federation knows; one that answers
the site's own class overrides the global model where the site has no evidence to do so.

Nothing leaves the site and nothing is released: these records are computed from the global model (already
public to the site) and the site's own features, so no ε is spent.
"""

from __future__ import annotations

import torch
from torch import nn

RARE_SHARE = 0.02  # a class with fewer than this share of the site's records, or fewer than RARE_MIN, is rare
RARE_MIN = 3
CONFIDENCE = 0.9  # the global model's probability a pseudo-record must reach
GUARD_MARGIN = 0.1  # a candidate may answer the global model's class on this many fewer pseudo-records
STEPS = 60
PER_CLASS = 32  # own records moved towards each rare class


def rare_classes(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A mask of the classes the site holds too few records of to model them itself (absent ones included)."""
    counts = torch.bincount(labels.long().cpu(), minlength=num_classes)
    return counts < max(RARE_MIN, RARE_SHARE * len(labels))


def pseudo_records(
    global_model: nn.Module, x: torch.Tensor, rare: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, class) of records the global model puts in a rare class with probability >= CONFIDENCE.

    Starting points are up to PER_CLASS of the site's own records per rare class, so the pseudo-records lie
    near the site's data; Adam on an additive shift, its step a share of the records' mean norm, as the head
    sees only the features' direction. Records that never reach CONFIDENCE are dropped.
    """
    classes = torch.nonzero(rare).flatten()
    if len(classes) == 0 or len(x) == 0:
        return x[:0], torch.zeros(0, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    starts = [x[torch.randperm(len(x), generator=g)[:PER_CLASS]] for _ in classes]
    target = torch.cat([torch.full((len(s),), int(c)) for s, c in zip(starts, classes, strict=True)])
    base = torch.cat(starts).float()
    shift = torch.zeros_like(base, requires_grad=True)
    optimizer = torch.optim.Adam([shift], lr=0.05 * float(base.norm(dim=1).mean()))
    global_model.eval()
    for p in global_model.parameters():
        p.requires_grad_(False)
    try:
        for _ in range(STEPS):
            optimizer.zero_grad()
            nn.functional.cross_entropy(global_model(base + shift), target).backward()
            optimizer.step()
        with torch.no_grad():
            moved = base + shift
            sure = global_model(moved).softmax(-1).gather(1, target[:, None]).squeeze(1) >= CONFIDENCE
    finally:
        for p in global_model.parameters():
            p.requires_grad_(True)
    return moved[sure].detach(), target[sure]


def keeps(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The share of pseudo-records on which `model` answers the global model's class (1.0 where there are none)."""
    if len(y) == 0:
        return 1.0
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())
