"""The GPU path: a site with a CUDA GPU extracts features and trains its DP head there (skipped without one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fedtransfer.common.config.run import BackboneConfig
from fedtransfer.common.encoders.image import load_backbone
from fedtransfer.common.encoders.registry import resolve_device
from fedtransfer.common.model.head import evaluate_head, make_head
from fedtransfer.common.privacy.calibration import epsilon_of, plan_dp
from fedtransfer.common.privacy.dp_sgd import LocalTraining, train_head

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


def test_auto_device_picks_the_gpu_and_the_head_trains_there_with_dp() -> None:
    device = resolve_device("auto")
    assert device == "cuda"
    backbone = load_backbone(BackboneConfig(image_size=64), device)
    before = {k: v.clone() for k, v in backbone.module.state_dict().items()}
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(256, 28, 28, 1), dtype=np.uint8)
    labels = torch.from_numpy(rng.integers(0, 10, size=256))
    feats = backbone.embed(images)
    cpu = load_backbone(BackboneConfig(image_size=64), "cpu").embed(images[:8])
    # cuDNN convolutions use TF32 on recent GPUs: features agree to about 1 %, not bit for bit
    assert torch.allclose(feats[:8], cpu, atol=2e-2, rtol=2e-2), "GPU and CPU features agree"
    after = backbone.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "BatchNorm statistics never move"
    head = make_head(backbone.feature_dim, 10).to(device)
    plan = plan_dp(
        num_samples=256,
        batch_size=32,
        local_epochs=2,
        rounds=1,
        target_epsilon=3.0,
        target_delta=1e-3,
        max_grad_norm=1.0,
        accountant="rdp",
    )
    out = train_head(head, feats, labels, LocalTraining(2, 32, 0.5), plan, [], seed=0)
    assert next(head.parameters()).device.type == "cuda"
    assert epsilon_of(out.history, 1e-3, "rdp") <= 3.0 + 1e-9
    scores = evaluate_head(head, feats, labels)
    assert np.isfinite(scores.loss) and 0.0 <= scores.accuracy <= 1.0


def test_skellam_shares_are_exact_with_a_gpu_generator() -> None:
    """A GPU site's generator lives on CUDA; its Skellam share is still drawn in int64 on the CPU (CUDA's
    torch.poisson counts in 32 bits and would wrap at this variance), then moved to the GPU exactly."""
    from fedtransfer.common.privacy import skellam

    mu, n = 2.0**40, 200_000
    generator = torch.Generator(device="cuda").manual_seed(3)
    integers = skellam.sample_integers(torch.Size([n]), mu, generator)
    assert integers.dtype == torch.int64 and integers.device.type == "cpu"
    assert float(integers.double().var()) == pytest.approx(mu, rel=0.02)
    moved = skellam.sample(torch.Size([n]), mu, torch.Generator(device="cuda").manual_seed(3), torch.device("cuda"))
    assert moved.device.type == "cuda" and torch.equal(moved.cpu(), integers.double())
