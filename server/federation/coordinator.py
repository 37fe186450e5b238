"""What the coordinator's round loop works with: the encoder, the server's hold-out, the head and the strategies.

Apart from the loop (server/federation/loop.py) because it is set up once per run and read by every round:
building it loads the backbone, extracts the hold-out's features and shapes the initial head, none of
which the loop's control flow needs to see.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fedtransfer.common.config.run import RunConfig
from fedtransfer.common.data.federation import federation_for
from fedtransfer.common.encoders.feature_cache import cached_features
from fedtransfer.common.encoders.registry import load_encoder, resolve_device
from fedtransfer.common.model.finetune import cut_encoder, make_top
from fedtransfer.common.model.head import evaluate_head
from fedtransfer.common.model.intervals import with_intervals
from fedtransfer.common.privacy.counts import round_zero_release
from fedtransfer.common.privacy.fedsgd import STATS_COUNTS, STATS_SUMS, start_from_statistics
from fedtransfer.common.wire.exchange import PREFIX, head_spec, head_to_arrays
from fedtransfer.server.export.model_file import head_from_arrays
from fedtransfer.server.federation import class_counts
from fedtransfer.server.federation.strategy import ScreenedStrategy, make_strategy, release_strategy
from flwr.app import ArrayRecord


@dataclass
class Coordinator:
    """What the loop works with: the encoder, the server's hold-out features, the head and the strategy."""

    cfg: RunConfig
    encoder: Any
    classes: list[str]
    test_x: torch.Tensor
    test_y: torch.Tensor
    strategy: ScreenedStrategy
    release: ScreenedStrategy | None = None  # round 0's release: the feature statistics, or under DP the counts

    def head(self, arrays: dict[str, np.ndarray]) -> torch.nn.Module:
        """The head (or fine-tuned top, common/model/finetune.py) holding these exchanged tensors."""
        return head_from_arrays(
            arrays, self.encoder, num_classes=len(self.classes), hidden=self.cfg.head.hidden, finetune=self.cfg.finetune
        )

    def start_from(self, head: dict[str, np.ndarray], stats: ArrayRecord) -> dict[str, np.ndarray]:
        """The head after round 0: centred on the released mean, started at the class means (post-processing).

        The record counts alone (privacy.feature_stats: false) leave the head as it was: the sites release them
        for their own weights and sample rates (client/dp_count.py). They are not kept for the global model's
        threshold, which stays as it was for runs without the statistics.
        """
        if not self.cfg.privacy.feature_stats:
            return head
        module = self.head(head)
        sums, counts = (torch.from_numpy(stats[name].numpy()) for name in (STATS_SUMS, STATS_COUNTS))
        start_from_statistics(module, sums, counts)
        class_counts.save_counts(self.cfg.output_path, counts.tolist())  # the global model's threshold (binary)
        return as_numpy(head_to_arrays(module))

    def evaluate(self, arrays: dict[str, np.ndarray]) -> dict[str, float | None]:
        """accuracy, loss, balanced_accuracy and auroc (None when the hold-out has one class) on the hold-out,
        with the record count and the 95% intervals of accuracy (Wilson) and AUROC (Hanley-McNeil)."""
        scores = evaluate_head(self.head(arrays), self.test_x, self.test_y).as_dict()
        return with_intervals(scores, self.test_y.cpu().numpy())


def set_up(cfg: RunConfig) -> tuple[Coordinator, dict[str, np.ndarray]]:
    """The coordinator of `cfg`'s run and the initial head: seeded by the config, not the process."""
    encoder = cut_encoder(load_encoder(cfg.backbone, resolve_device(cfg.device)), cfg.finetune)
    fed = federation_for(cfg)
    test_x, _ = cached_features(encoder, fed.server_test, cfg.cache_path)
    classes = list(fed.server_test.classes)
    with torch.random.fork_rng(devices=[]):  # the initial head is the config's seed, without seeding the process
        torch.manual_seed(cfg.seed)
        head = make_top(
            encoder, len(classes), hidden=cfg.head.hidden, centred=cfg.privacy.feature_stats, ft=cfg.finetune
        ).cpu()
    spec = head_spec(head)
    frozen = frozenset(PREFIX + k for k, _ in head.named_buffers())
    strategy = ScreenedStrategy(make_strategy(cfg, frozen), spec, cfg.train.min_sites, cfg.train.max_update_norm)
    release = None
    if round_zero_release(cfg.privacy) is not None:  # the statistics, or under DP the record counts alone
        stats_spec = {STATS_COUNTS: ((len(classes),), "float32")}
        if cfg.privacy.feature_stats:
            stats_spec = {STATS_SUMS: ((len(classes), encoder.feature_dim), "float32"), **stats_spec}
        release = ScreenedStrategy(release_strategy(cfg.train), stats_spec, cfg.train.min_sites)
    coordinator = Coordinator(
        cfg, encoder, classes, test_x, torch.from_numpy(fed.server_test.labels), strategy, release
    )
    return coordinator, as_numpy(head_to_arrays(head))


def as_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """The exchanged tensors as the loop keeps the head between rounds: named numpy arrays."""
    return {k: v.numpy() for k, v in arrays.items()}
