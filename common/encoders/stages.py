"""Encoders as a sequence of blocks: where fine-tuning can cut a torchvision network or a transformer.

`flat_modules(name, net)` lists the modules the feature network (classifier stripped) runs,
in order, so that running them one after another is its forward in eval mode; `blocks`
groups them into blocks, each starting at a module with weights of its own (a convolution,
a residual block, an inverted-residual block, a linear layer) and taking the weight-free
modules (pooling, activation) that follow it. The last k blocks are what `finetune.blocks: k`
trains; everything below them runs once per sample (common/model/finetune.py).

A text encoder's blocks are its transformer layers: `text_split` cuts below the last k of
them; the cut's activations are the hidden states with the attention mask beside them, and
the top runs the last k layers and then the encoder's own pooling (common/encoders/text.py
hands over the modules; this module never imports transformers).
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)


def flat_modules(name: str, net: nn.Module) -> list[nn.Module]:
    """The feature network's forward as a flat list of modules (the module objects of `net`, not copies)."""
    pool_flatten = [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
    if name == "mobilenet_v2":  # forward: features, adaptive_avg_pool2d, flatten, classifier (stripped)
        return [*net.features, *pool_flatten]
    if name == "mobilenet_v3_small":
        return [*net.features, net.avgpool, nn.Flatten(1)]
    if name in ("resnet18", "resnet50"):
        return [
            net.conv1,
            net.bn1,
            net.relu,
            net.maxpool,
            *net.layer1,
            *net.layer2,
            *net.layer3,
            *net.layer4,
            net.avgpool,
            nn.Flatten(1),
        ]
    if name == "vgg16":  # its classifier minus the last Linear (stripped to Identity) belongs to the features
        return [*net.features, net.avgpool, nn.Flatten(1), *list(net.classifier)[:-1]]
    if name == "efficientnet_b0":
        stages = list(net.features)
        return [stages[0], *(m for stage in stages[1:-1] for m in stage), stages[-1], net.avgpool, nn.Flatten(1)]
    if name == "inception_v3":  # torchvision's _forward order; the auxiliary head (training only) is not part of it
        order = [
            "Conv2d_1a_3x3",
            "Conv2d_2a_3x3",
            "Conv2d_2b_3x3",
            "maxpool1",
            "Conv2d_3b_1x1",
            "Conv2d_4a_3x3",
            "maxpool2",
            "Mixed_5b",
            "Mixed_5c",
            "Mixed_5d",
            "Mixed_6a",
            "Mixed_6b",
            "Mixed_6c",
            "Mixed_6d",
            "Mixed_6e",
            "Mixed_7a",
            "Mixed_7b",
            "Mixed_7c",
            "avgpool",
        ]
        return [*(getattr(net, n) for n in order), net.dropout, nn.Flatten(1)]
    raise KeyError(f"no block structure for {name}")


def _starts_block(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) and not isinstance(module, _NORMS)


def blocks(modules: list[nn.Module]) -> list[list[nn.Module]]:
    """`modules` grouped into blocks: each opens at a module with weights (not a norm layer)."""
    groups: list[list[nn.Module]] = []
    for module in modules:
        if _starts_block(module) or not groups:
            groups.append([module])
        else:
            groups[-1].append(module)
    return groups


def split(name: str, net: nn.Module, k: int) -> tuple[nn.Sequential, nn.Sequential]:
    """(below the cut, the last k blocks) of the feature network: their composition is its forward."""
    groups = blocks(flat_modules(name, net))
    if not 1 <= k < len(groups):
        raise ValueError(f"{name} has {len(groups)} blocks; finetune.blocks must be 1..{len(groups) - 1}")
    below = [m for g in groups[:-k] for m in g]
    above = [m for g in groups[-k:] for m in g]
    return nn.Sequential(*below), nn.Sequential(*above)


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """`module` in eval mode with each BatchNorm that directly follows a convolution in a sequence folded into it.

    Below the cut the network only ever runs in eval mode, where BatchNorm is a fixed affine map
    per channel: the convolution before it can compute both in one pass (the same values to float
    rounding) instead of two over the largest activations of the network (MobileNetV2 at 224 px
    below its last block: 18 against 30 ms of CPU per image). Only sequences are folded, where the
    children's order is the forward's. Modules it does not change are shared, never copied, and
    `module` itself is left as it was: its weights are the fingerprinted encoder's.
    """
    children = dict(module.named_children())
    new = {name: fold_batchnorm(child) for name, child in children.items()}
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        names = list(new)
        for first, second in itertools.pairwise(names):
            conv, norm = new[first], new[second]
            if isinstance(conv, nn.Conv2d) and type(norm) is nn.BatchNorm2d and norm.running_var is not None:
                new[first] = fuse_conv_bn_eval(conv.eval(), norm.eval()).requires_grad_(False)
                new[second] = nn.Identity()
    if all(new[name] is child for name, child in children.items()):
        return module.eval()
    out = copy.copy(module)
    out.__dict__["_modules"] = {**module._modules, **new}  # copy.copy shares the dict of children: not this one
    return out.eval()


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, L) 1/0 attention mask -> the (N, 1, 1, L) additive bias a transformer layer adds to its attention scores."""
    return (1.0 - mask.to(dtype))[:, None, None, :] * torch.finfo(dtype).min


class TextBelow(nn.Module):
    """A transformer encoder up to the cut: token embeddings and the layers below, on tokenized text.

    Gives (N, L, hidden + 1): the hidden states at the cut and, as the last channel, the
    attention mask, so the cached activations alone are all the top needs.
    """

    def __init__(self, embeddings: nn.Module, layers: list[nn.Module]) -> None:
        super().__init__()
        self.embeddings, self.layers = embeddings, nn.ModuleList(layers)

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        states = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        bias = additive_mask(attention_mask, states.dtype)
        for layer in self.layers:
            states = layer(states, bias)
        return torch.cat([states, attention_mask[..., None].to(states.dtype)], dim=-1)


class TextAbove(nn.Module):
    """The transformer layers above the cut, then the encoder's own pooling (and normalisation) modules.

    Input: what `TextBelow` gives, (N, L, hidden + 1); output: the (N, hidden) sentence
    embedding the frozen encoder would give (the same modules, in the same order).
    """

    def __init__(self, layers: list[nn.Module], pooling: list[nn.Module], hidden: int) -> None:
        super().__init__()
        self.layers, self.pooling, self.hidden = nn.ModuleList(layers), nn.ModuleList(pooling), hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states, mask = x[..., : self.hidden], x[..., self.hidden]
        bias = additive_mask(mask, states.dtype)
        for layer in self.layers:
            states = layer(states, bias)
        features = {"token_embeddings": states, "attention_mask": mask}
        for module in self.pooling:  # sentence-transformers modules: a dict in, the dict out
            features = module(features)
        return features["sentence_embedding"]


def text_split(
    embeddings: nn.Module, layers: list[nn.Module], *, pooling: list[nn.Module], hidden: int, k: int
) -> tuple[TextBelow, TextAbove]:
    """(below the cut, the last k layers and the pooling) of a transformer encoder: composed, its forward."""
    if not 1 <= k <= len(layers):  # the embeddings always stay below
        raise ValueError(f"the text encoder has {len(layers)} layers; finetune.blocks must be 1..{len(layers)}")
    return TextBelow(embeddings, layers[:-k]), TextAbove(layers[-k:], pooling, hidden)
