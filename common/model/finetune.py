"""Fine-tuning beyond the head: the encoder cut into a frozen part and a trainable top.

Below the cut, the encoder is frozen and runs once per sample per run: `CutEncoder` is an
`Encoder` whose "features" are the activations at the cut (flattened), cached on disk like
any features (common/encoders/feature_cache.py, memory-mapped by common/encoders/cut_cache.py). Above the cut, a
`Top` holds a copy of the last k blocks and the head; it is what a site trains under Opacus
and what the exchange, the server's screening, the audit and the exported model see as
"the head": its `state_dict()` is exactly the tensors that train (and the head's buffers),
never the frozen weights, which every party rebuilds from the fingerprinted encoder.

BatchNorm above the cut never uses batch statistics: it becomes torchvision's
`FrozenBatchNorm2d` at the pretrained statistics (`finetune.norm: frozen`), or GroupNorm
(`groupnorm`, Opacus' own replacement, trained). Dropout and stochastic depth above the cut
become identities, so the top computes in training exactly what it computes in evaluation.
LoRA adapters come from Hugging Face peft (`inject_adapter_in_model`), on every convolution
without groups and every linear layer of the top blocks.

Image backbones cut between torchvision blocks, text encoders between transformer layers
(common/encoders/stages.py): the same `CutEncoder`, `Top` and exchange serve both; a text
top's input is the hidden states at the cut with the attention mask as an extra channel.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from fedtransfer.common.config.finetune import FinetuneConfig
from fedtransfer.common.encoders.interface import Encoder, EncoderError
from fedtransfer.common.model.head import make_head
from torch import nn

_DROPS = (nn.Dropout, nn.Dropout2d, nn.AlphaDropout)


class Off(nn.Identity):
    """Dropout switched off: the identity, with the rate 0 that code reading a dropout's `p` (HF attention) finds."""

    p = 0.0


class CutEncoder:
    """An `Encoder` whose features are the activations at the cut below the last `k` blocks of `base`.

    Its fingerprint is the base encoder's (the same weights: a site checks it against the
    server's); its describe() adds the cut, so the cached activations never mix with features.
    """

    def __init__(
        self,
        base: Encoder,
        k: int,
        below: Callable[[Any], torch.Tensor],
        above: nn.Module,
        shape: tuple[int, ...],
        cache_max_bytes: int,
        module: nn.Module | None = None,
    ) -> None:
        self.base, self.k, self.above, self.shape = base, k, above, shape
        self.module = module  # image cuts: the frozen network below the cut on preprocessed input (serving graphs)
        self.name, self.kind, self.device, self.fingerprint = base.name, base.kind, base.device, base.fingerprint
        self.feature_dim = math.prod(shape)
        self.top_dim = base.feature_dim  # what the top gives the head
        self.cache_max_bytes = cache_max_bytes
        self._below = below

    def embed(self, inputs: Any) -> torch.Tensor:
        """Raw inputs to (N, feature_dim) float32 activations at the cut, without grad."""
        with torch.inference_mode():
            return self._below(inputs).reshape(len(inputs), -1).float().cpu()

    def describe(self) -> dict[str, Any]:
        return {**self.base.describe(), "cut": {"blocks": self.k}}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.base.state_dict()


def cut_encoder(encoder: Encoder, ft: FinetuneConfig) -> Encoder:
    """`encoder` itself when only the head trains; else the encoder cut below its last `ft.blocks` blocks."""
    if not ft.active:
        return encoder
    cut = _CUTS.get(encoder.kind)
    if cut is None:  # the config refuses it first (CATALOG's blocks is 0 for tabular encoders)
        raise EncoderError(
            f"finetune.train: {ft.train} needs an image or text encoder; {encoder.name} is {encoder.kind}; use head"
        )
    return cut(encoder, ft.blocks, int(ft.cache_max_gb * (1 << 30)))


def _image_cut(encoder: Any, k: int, cache_max_bytes: int) -> CutEncoder:
    from fedtransfer.common.encoders.stages import fold_batchnorm, split  # image internals: the ImageBackbone's

    below, above = split(encoder.name, encoder.module.net, k)
    below = fold_batchnorm(below.eval()).requires_grad_(False)  # it only ever runs in eval mode

    def run(inputs: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(inputs)).to(encoder.device).permute(0, 3, 1, 2).float().div_(255.0)
        return below(encoder.preprocess(x))

    probe = np.zeros((1, encoder.image_size, encoder.image_size, 3), np.uint8)
    with torch.inference_mode():
        shape = tuple(run(probe).shape[1:])
    return CutEncoder(encoder, k, run, above, shape, cache_max_bytes, below)


def _text_cut(encoder: Any, k: int, cache_max_bytes: int, batch_size: int = 32) -> CutEncoder:
    """A text encoder cut below its last k transformer layers (common/encoders/text.py:TextEncoder.parts).

    The activations are (max_seq_length, hidden + 1) per text: the hidden states at the cut
    and the attention mask, every text padded to max_seq_length tokens.
    """
    from fedtransfer.common.encoders.stages import text_split

    embeddings, layers, pooling = encoder.parts()
    hidden = int(embeddings.word_embeddings.embedding_dim)
    below, above = text_split(embeddings, layers, pooling=pooling, hidden=hidden, k=k)
    below = below.eval().requires_grad_(False)

    def run(inputs: Any) -> torch.Tensor:
        if not len(inputs):
            return torch.empty(0, encoder.max_seq_length, hidden + 1)
        tokens = encoder.tokens(inputs)
        return torch.cat(
            [
                below(**{key: v[i : i + batch_size] for key, v in tokens.items()})
                for i in range(0, len(inputs), batch_size)
            ]
        )

    return CutEncoder(encoder, k, run, above, (encoder.max_seq_length, hidden + 1), cache_max_bytes)


_CUTS: dict[str, Callable[[Any, int, int], CutEncoder]] = {"image": _image_cut, "text": _text_cut}


class Top(nn.Module):
    """The trainable top: the last blocks of the encoder (a copy) and the head, on cut activations.

    `state_dict()` and `load_state_dict()` cover exactly the exchanged tensors: every
    parameter that trains and the head's whole state. The frozen tensors above the cut (LoRA's
    base weights, frozen BatchNorm statistics) are not in it: they are the encoder's, pinned
    by its fingerprint, and never leave a site.
    """

    def __init__(self, blocks: nn.Module, head: nn.Module, shape: tuple[int, ...], lr_scale: float) -> None:
        super().__init__()
        self.blocks, self.head, self.shape, self.lr_scale = blocks, head, shape, lr_scale
        trained = {f"blocks.{n}" for n, p in blocks.named_parameters() if p.requires_grad}
        self.exchanged = frozenset(trained | {f"head.{n}" for n in head.state_dict()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, *self.shape).to(torch.float32)  # -1, not len(x): traced graphs keep the batch free
        return self.head(self.blocks(x))

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        full = super().state_dict(prefix=prefix, keep_vars=keep_vars)
        out = type(full)() if destination is None else destination
        for name in sorted(self.exchanged):
            out[prefix + name] = full[prefix + name]
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        names = set(state_dict)
        if names != self.exchanged and (strict or names - self.exchanged):
            missing, extra = sorted(self.exchanged - names), sorted(names - self.exchanged)
            raise RuntimeError(f"not this top's tensors: missing {missing[:5]}, unexpected {extra[:5]}")
        return super().load_state_dict(state_dict, strict=False, assign=assign)


def make_top(encoder: Encoder, num_classes: int, *, hidden: int, centred: bool, ft: FinetuneConfig) -> nn.Module:
    """What trains at a site for this run: the head alone (today's), or a `Top` above the encoder's cut."""
    if not isinstance(encoder, CutEncoder):
        return make_head(encoder.feature_dim, num_classes, hidden, centred=centred)
    blocks = trainable_blocks(encoder.above, ft)
    return Top(
        blocks, make_head(encoder.top_dim, num_classes, hidden, centred=centred), encoder.shape, ft.backbone_lr_scale
    ).to(encoder.device)


def trainable_blocks(above: nn.Module, ft: FinetuneConfig) -> nn.Module:
    """A copy of the blocks above the cut, ready for DP-SGD: no batch statistics, no dropout, peft's LoRA if asked."""
    blocks = copy.deepcopy(above).train().requires_grad_(ft.train == "blocks")
    _strip_dropout(blocks)
    if ft.norm == "groupnorm":  # Opacus' own replacement (it replaces the trainable BatchNorms: all of them here)
        from opacus.validators import ModuleValidator

        blocks = ModuleValidator.fix(blocks)
    else:
        _freeze_batchnorm(blocks)
    if ft.train == "lora":
        blocks = _with_lora(blocks, ft)
    return blocks


def _strip_dropout(module: nn.Module) -> None:
    """Dropout and stochastic depth become identities; in-place activations stop being in place.

    Opacus' backward hooks on a layer with weights forbid an in-place change of its output.
    """
    from torchvision.ops import StochasticDepth

    for name, child in module.named_children():
        if isinstance(child, (*_DROPS, StochasticDepth)):
            setattr(module, name, Off())
        else:
            if getattr(child, "inplace", False) is True:
                child.inplace = False
            _strip_dropout(child)


def _freeze_batchnorm(module: nn.Module) -> None:
    """Every BatchNorm becomes torchvision's FrozenBatchNorm2d with the same statistics and affine (buffers)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            _freeze_batchnorm(child)


def lora_targets(module: nn.Module) -> list[str]:
    """The layers LoRA adapts: linear layers and convolutions without groups (peft needs rank % groups == 0)."""
    return [
        name
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)
    ]


def _with_lora(blocks: nn.Module, ft: FinetuneConfig) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    targets = lora_targets(blocks)
    if not targets:
        raise EncoderError("finetune.train: lora found no linear layer or convolution in the top blocks; use blocks")
    pattern = "|".join(re.escape(t) for t in targets)  # a string is a full-match regex: exactly these layers
    config = LoraConfig(r=ft.lora_rank, lora_alpha=ft.lora_alpha, target_modules=pattern, lora_dropout=0.0)
    return inject_adapter_in_model(config, blocks)


def trains(ft: FinetuneConfig) -> dict[str, Any]:
    """What trains and leaves a site in this run, as the run-started audit record states it."""
    if not ft.active:
        return {"train": "head"}
    extra = {"lora_rank": ft.lora_rank, "lora_alpha": ft.lora_alpha} if ft.train == "lora" else {"norm": ft.norm}
    return {"train": ft.train, "blocks": ft.blocks, **extra}


def parameter_groups(module: nn.Module, learning_rate: float) -> list[dict[str, Any]]:
    """The optimizer's groups: the head at `learning_rate`, the encoder's trainable tensors at lr x backbone scale."""
    if not isinstance(module, Top):
        return [{"params": [p for p in module.parameters() if p.requires_grad], "lr": learning_rate}]
    encoder_part = [p for p in module.blocks.parameters() if p.requires_grad]
    groups = [{"params": list(module.head.parameters()), "lr": learning_rate}]
    return groups + ([{"params": encoder_part, "lr": learning_rate * module.lr_scale}] if encoder_part else [])
