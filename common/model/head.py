"""The classification head: the only part of the model that trains and leaves a site."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

FEATURE_SCALE = 8.0
EVAL_BATCH = 1024  # samples per forward pass in evaluate_head


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


class Centre(nn.Module):
    """Unit-normalise each feature vector, then subtract a released mean (the buffer `mean`).

    The mean is the server's DP estimate from the sites' feature statistics (round 0): once
    released, x -> normalise(x) - mean is a per-record map like the normalisation itself,
    so it costs no further privacy. It travels and is exported with the head.
    """

    def __init__(self, feature_dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(feature_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, dim=1) - self.mean


CENTRE_KEY = "0.mean"  # the state-dict name of a centred head's mean


def make_head(feature_dim: int, num_classes: int, hidden: int = 0, centred: bool = False) -> nn.Sequential:
    """Linear probe by default; one hidden ReLU layer when `hidden` > 0; `centred` puts `Centre` first.

    No BatchNorm here: Opacus' per-sample gradients need layers without batch statistics.
    """
    layers: list[nn.Module] = [Centre(feature_dim)] if centred else []
    layers.append(L2Normalize(FEATURE_SCALE))
    if hidden:
        return nn.Sequential(*layers, nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
    return nn.Sequential(*layers, nn.Linear(feature_dim, num_classes))


def is_centred(state_names: Iterable[str]) -> bool:
    """Whether a head's state (its tensor names, with or without the exchange prefix) holds a centring mean."""
    return any(name == CENTRE_KEY or name.endswith("." + CENTRE_KEY) for name in state_names)


@dataclass(frozen=True)
class Scores:
    """How a head does on labelled features. Imbalanced data (a few percent defaults) is the rule at a bank:
    accuracy alone rewards always answering the majority class, so balanced accuracy and AUROC stand beside it.

    `auroc` is macro one-vs-rest over the classes present in `labels` (for 2 classes, the plain AUROC);
    None when fewer than 2 classes are present, where no AUROC exists.
    """

    loss: float
    accuracy: float
    balanced_accuracy: float  # mean recall over the classes present in the labels
    auroc: float | None

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)


def evaluate_head(head: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> Scores:
    """Loss, accuracy, balanced accuracy and AUROC of `head` on (features, labels)."""
    device = next(head.parameters()).device
    head.eval()
    with (
        torch.no_grad()
    ):  # in slices: a fine-tuned top runs encoder blocks on cut activations (common/model/finetune.py)
        logits = torch.cat(
            [head(features[i : i + EVAL_BATCH].to(device)) for i in range(0, max(len(features), 1), EVAL_BATCH)]
        )
        loss = nn.functional.cross_entropy(logits, labels.to(device)).item()
        probs = logits.softmax(1).cpu().double().numpy()
    truth, predicted = labels.cpu().numpy(), probs.argmax(1)
    present = np.unique(truth)
    recall = [float((predicted[truth == c] == c).mean()) for c in present]
    return Scores(
        loss,
        float((predicted == truth).mean()) if len(truth) else float("nan"),
        float(np.mean(recall)) if recall else float("nan"),
        macro_auroc(truth, probs),
    )


def macro_auroc(truth: np.ndarray, probs: np.ndarray) -> float | None:
    """Mean over the classes present of the AUROC of "this class" against the rest; None below 2 classes.

    Each AUROC is the Mann-Whitney statistic on average ranks (ties count one half), the value
    scikit-learn's `roc_auc_score` gives, for all classes in one ranking: a site's collaboration
    report scores 200 bootstrap resamples of three models, and scikit-learn's per-call input
    checks made that minutes of CPU per site on a 10-class test split.
    """
    from scipy.stats import rankdata

    present = np.unique(truth)
    if len(present) < 2:
        return None
    ranks = rankdata(np.asarray(probs)[:, present], axis=0)  # average ranks within each class's column
    positive = np.asarray(truth)[:, None] == present[None, :]
    n_pos = positive.sum(0)
    n_neg = len(truth) - n_pos
    rank_sums = np.where(positive, ranks, 0.0).sum(0)
    return float(np.mean((rank_sums - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)))
