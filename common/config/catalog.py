"""The encoders a run may name, and what the config must know of each before any is loaded.

Public configuration: the config validates encoder names, image sizes and fine-tuning depth against
`CATALOG` without importing torch or torchvision; each implementation (common/encoders/) registers
under the same names.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EncoderSpec:
    """What the config needs to know about a registered encoder before any of it is loaded."""

    kind: str
    feature_dim: int
    min_image_size: int = 32  # image encoders only: the smallest input their downsampling takes
    blocks: int = 0  # the most blocks `finetune.blocks` may train above the cut (0: none, head only)


CATALOG: dict[str, EncoderSpec] = {
    "mobilenet_v2": EncoderSpec("image", 1280, blocks=18),
    "mobilenet_v3_small": EncoderSpec("image", 576, blocks=12),
    "resnet18": EncoderSpec("image", 512, blocks=8),
    "resnet50": EncoderSpec("image", 2048, blocks=16),
    "vgg16": EncoderSpec("image", 4096, blocks=14),
    "efficientnet_b0": EncoderSpec("image", 1280, blocks=17),
    "inception_v3": EncoderSpec("image", 2048, min_image_size=75, blocks=15),  # 299 px is its native input
    "all-MiniLM-L6-v2": EncoderSpec("text", 384, blocks=6),  # sentence-transformers, offline (common/encoders/text.py)
    "tabular": EncoderSpec(
        "tabular", 0
    ),  # feature_dim 0: the schema (backbone.schema) decides it (common/encoders/tabular.py)
}
