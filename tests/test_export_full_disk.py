"""A disk that fills while the model is exported fails the run with the reason, and leaves no torn model.pt.

A real full filesystem: a 1 MiB tmpfs mounted for the test (root only; skipped where mounting
is not allowed), smaller than the MobileNetV2 weights the model file carries.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from fedtransfer.common.config.run import BackboneConfig, RunConfig
from fedtransfer.common.encoders.registry import load_encoder
from fedtransfer.common.model.head import make_head
from fedtransfer.common.wire.exchange import head_spec, head_to_arrays
from fedtransfer.server.federation.loop import Coordinator, export_or_why
from fedtransfer.server.federation.strategy import ScreenedStrategy, make_strategy


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()[:80]}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_during_export_fails_the_run_and_leaves_no_torn_file(full_disk: Path) -> None:
    cfg = replace(RunConfig(), output_dir=str(full_disk / "run"))
    cfg.output_path.mkdir()
    encoder = load_encoder(BackboneConfig(image_size=32), "cpu")
    head = make_head(encoder.feature_dim, 3)
    strategy = ScreenedStrategy(make_strategy(cfg), head_spec(head), cfg.train.min_sites)
    co = Coordinator(cfg, encoder, ["a", "b", "c"], torch.zeros(0), torch.zeros(0), strategy)
    arrays = {k: v.numpy() for k, v in head_to_arrays(head).items()}
    model, why = export_or_why(co, arrays)
    assert model is None
    assert why is not None and "No space left on device" in why and "--resume" in why
    assert list(cfg.output_path.iterdir()) == [], "neither model.pt nor a temporary file is left behind"
