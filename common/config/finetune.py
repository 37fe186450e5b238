"""What trains beyond the head (`finetune:`) and each site's own model (`personal:`): config, torch-free.

Kept apart from common/config/run.py so that the run config stays one screen per section; the
run config holds these two sections and calls `check_run` for the rules that span sections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from fedtransfer.common.config.catalog import CATALOG
from fedtransfer.common.config.parse import require as _require


@dataclass(frozen=True)
class FinetuneConfig:
    """What a site trains and sends: the head only, or the encoder's last `blocks` blocks too, or LoRA adapters.

    head: today's linear probe on cached features. blocks: the last `blocks` blocks of the
    encoder train with the head (their BatchNorm frozen at the pretrained statistics, or
    replaced by GroupNorm). lora: those blocks stay frozen and rank-`lora_rank` adapters
    (Hugging Face peft) on their convolutions and linear layers train with the head. Below
    the cut the encoder runs once per sample per run; its activations are cached on disk.
    """

    train: Literal["head", "blocks", "lora"] = "head"
    blocks: int = 1  # blocks above the cut (blocks and lora)
    lora_rank: int = 4
    lora_alpha: float = 8.0  # peft's scaling numerator: the adapter's output is scaled by alpha / rank
    norm: Literal["frozen", "groupnorm"] = "frozen"  # BatchNorm above the cut: pretrained statistics, or GroupNorm
    backbone_lr_scale: float = 1.0  # learning rate of the encoder's tensors (blocks, adapters) = this x train's
    cache_max_gb: float = 20.0  # the cut-point activations kept on disk (least recently used go first)

    def __post_init__(self) -> None:
        _require(1 <= self.blocks <= 64, "finetune.blocks", "must be 1..64", self.blocks)
        _require(1 <= self.lora_rank <= 256, "finetune.lora_rank", "must be 1..256", self.lora_rank)
        _require(0 < self.lora_alpha <= 1024, "finetune.lora_alpha", "must be in (0, 1024]", self.lora_alpha)
        _require(
            0 < self.backbone_lr_scale <= 10, "finetune.backbone_lr_scale", "must be in (0, 10]", self.backbone_lr_scale
        )
        _require(
            self.norm == "frozen" or self.train == "blocks",
            "finetune.norm",
            "groupnorm replaces the pretrained statistics with new weights that must train: needs train: blocks",
            self.norm,
        )
        _require(0 < self.cache_max_gb <= 100_000, "finetune.cache_max_gb", "must be in (0, 100000]", self.cache_max_gb)

    @property
    def active(self) -> bool:
        """Whether anything beyond the head trains (a cut point exists)."""
        return self.train != "head"


@dataclass(frozen=True)
class PersonalConfig:
    """Each site's own model: never sent, and never worse on the site's own validation split than alone or global.

    Without DP (`dp: false`, the default: the site's records and this model never leave it), the site
    chooses its final model once, after the last round (client/site_model/final.py): going alone, the global
    model, or the global model fine-tuned on its records with a pull towards it, whichever does best on
    a validation split carved from its training split; `learning_rate` is that fine-tuning's. Its scores
    stay in the site's collaboration report (client/site_model/report.py). With `dp: true` the site trains a
    Ditto copy every round instead (`epochs` local epochs, pull `lam`) under DP-SGD with its own budget
    (`target_epsilon`, the run's δ) and reports its accuracy beside the global model's.
    The final model is chosen at the last round's evaluation: a site the server does not ask to evaluate
    then (`train.fraction_evaluate` below 1, or 0) keeps none and writes no report.
    """

    enabled: bool = True
    epochs: int = 2
    lam: float = 0.1
    learning_rate: float = 0.5
    dp: bool = False
    target_epsilon: float = 3.0
    threshold: str = "balanced_accuracy"  # a binary model's decision rule: balanced_accuracy or cost:R

    def __post_init__(self) -> None:
        threshold_rule(self.threshold)  # ConfigError naming personal.threshold
        _require(1 <= self.epochs <= 1000, "personal.epochs", "must be 1..1000", self.epochs)
        _require(0 <= self.lam <= 100, "personal.lam", "must be in [0, 100]", self.lam)
        _require(0 < self.learning_rate <= 100, "personal.learning_rate", "must be in (0, 100]", self.learning_rate)
        _require(0 < self.target_epsilon <= 100, "personal.target_epsilon", "must be in (0, 100]", self.target_epsilon)


@dataclass(frozen=True)
class ThresholdRule:
    """How a binary model's decision threshold is chosen: the positive class is predicted when its probability
    is at least the threshold.

    `balanced_accuracy`: the threshold of highest balanced accuracy (mean of the two recalls); on a table with
    a few percent positives, argmax (0.5) of a DP model predicts almost no positive at all. `cost:R`: a missed
    positive costs R times a false alarm (a missed default against a refused good customer); the threshold of
    lowest total cost, whose Bayes value for calibrated probabilities is 1 / (1 + R).
    """

    kind: Literal["balanced_accuracy", "cost"]
    cost_ratio: float | None = None  # R of cost:R

    def __str__(self) -> str:
        return self.kind if self.cost_ratio is None else f"cost:{self.cost_ratio:g}"


def threshold_rule(text: object, key: str = "personal.threshold") -> ThresholdRule:
    """`balanced_accuracy` or `cost:R` (R > 0, a missed positive's cost over a false alarm's) as a ThresholdRule."""
    allowed = "balanced_accuracy, or cost:R with R > 0 the cost of a missed positive over a false alarm's (cost:5)"
    if text == "balanced_accuracy":
        return ThresholdRule("balanced_accuracy")
    ratio = None
    if isinstance(text, str) and text.startswith("cost:"):
        try:
            ratio = float(text.removeprefix("cost:"))
        except ValueError:
            ratio = None
    _require(ratio is not None and 0 < ratio <= 1e6, key, allowed, text)
    return ThresholdRule("cost", ratio)


def check_run(cfg: Any) -> None:
    """The rules that tie `finetune` and `personal` to the other sections of a RunConfig (one line naming the key).

    `cfg` is common.config.run.RunConfig, which calls this from its own validation (typed Any: no import cycle).
    """
    ft, spec = cfg.finetune, CATALOG[cfg.backbone.name]
    if ft.active:
        _require(
            spec.blocks > 0,
            "finetune.train",
            f"{cfg.backbone.name} is a {spec.kind} encoder; this version "
            "fine-tunes image backbones and text encoders only; use head",
            ft.train,
        )
        _require(
            ft.blocks <= spec.blocks, "finetune.blocks", f"must be 1..{spec.blocks} for {cfg.backbone.name}", ft.blocks
        )
        _require(
            ft.norm == "frozen" or spec.kind == "image",
            "finetune.norm",
            f"{cfg.backbone.name} has no "
            "BatchNorm to replace (its layers use LayerNorm, which trains with them); use frozen",
            ft.norm,
        )
        _require(
            cfg.train.protocol == "fedavg",
            "train.protocol",
            "fine-tuning beyond the head needs fedavg: "
            "fedsgd's per-record gradient sum and its audit are written for the head on cached features; "
            "use fedavg, or finetune.train: head",
            cfg.train.protocol,
        )
        _require(
            not cfg.privacy.feature_stats,
            "privacy.feature_stats",
            "the released feature statistics describe "
            "the frozen encoder's features, which fine-tuned blocks change; set false",
            True,
        )
    if cfg.personal.enabled and cfg.personal.dp:  # the DP Ditto copy trains at every round's evaluation
        _require(
            cfg.train.fraction_evaluate > 0,
            "train.fraction_evaluate",
            "personal models train and are evaluated when the server asks for evaluation; must be > 0",
            cfg.train.fraction_evaluate,
        )
        _require(
            cfg.train.evaluate_every == 1,
            "train.evaluate_every",
            "personal models train when the server asks for evaluation, so every round; must be 1",
            cfg.train.evaluate_every,
        )
