"""Round time: fedtransfer (features once, head-only DP) against the usual way, side by side.

The usual way is Flower's examples/opacus pattern: every round each site builds a new
PrivacyEngine around the whole model and runs the backbone forward on every batch of every
local epoch (backbone frozen, only the head updated). Both run here in one process on the
same sites, data, image size, rounds and ε; the ratio is what to read, not the absolute times.

    .venv/bin/python -m benchmarks.round_time [--sizes 64 224] [--sites 2] [--samples 128] [--rounds 3]

(default: 64 px only, so that `make bench` stays short; the docs/benchmarks.md figures use --sizes 64 224)
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from fedtransfer.common.config.run import BackboneConfig
from fedtransfer.common.data.federation import partition_iid
from fedtransfer.common.data.sources import load_source
from fedtransfer.common.encoders.feature_cache import extract
from fedtransfer.common.encoders.image import load_backbone
from fedtransfer.common.encoders.registry import resolve_device
from fedtransfer.common.model.head import make_head
from fedtransfer.common.privacy.calibration import plan_dp
from fedtransfer.common.privacy.dp_sgd import LocalTraining, train_head
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.harness import print_table, write_results


def usual_round(
    backbone, images: np.ndarray, labels: np.ndarray, head: nn.Module, epochs: int, batch: int, sigma: float
) -> float:
    """One site, one round, the examples/opacus way: returns seconds."""
    t0 = time.perf_counter()
    model = nn.Sequential(backbone.preprocess, backbone.module, head)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0).to(backbone.device)
    loader = DataLoader(TensorDataset(x, torch.from_numpy(labels).to(backbone.device)), batch_size=batch)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = PrivacyEngine()  # a new engine every round, as in the example
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma, max_grad_norm=1.0
        )
        for _ in range(epochs):
            for xb, yb in loader:
                optimizer.zero_grad()
                if len(yb):
                    nn.functional.cross_entropy(model(xb), yb).backward()
                optimizer.step()
    if backbone.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run(size: int, sites: int, samples: int, rounds: int, epochs: int, batch: int, device: str) -> list[dict]:
    backbone = load_backbone(BackboneConfig(image_size=size), device)
    pool = load_source("mnist", None, size)
    parts = [p[:samples] for p in partition_iid(pool.labels, sites, seed=0)]
    data = [(pool.inputs[p], pool.labels[p]) for p in parts]
    plan = plan_dp(
        num_samples=samples,
        batch_size=batch,
        local_epochs=epochs,
        rounds=rounds,
        target_epsilon=3.0,
        target_delta=1e-3,
        max_grad_norm=1.0,
        accountant="rdp",
    )
    rows = []
    # fedtransfer: the backbone runs once per sample per run (round 1), then every round is head-only
    feats = []
    t0 = time.perf_counter()
    for images, _ in data:
        feats.append(extract(backbone, images))
    extraction = time.perf_counter() - t0
    histories = [[] for _ in data]
    for rnd in range(1, rounds + 1):
        t0 = time.perf_counter()
        for i, ((_, labels), x) in enumerate(zip(data, feats, strict=True)):
            head = make_head(backbone.feature_dim, 10).to(backbone.device)
            out = train_head(
                head, x, torch.from_numpy(labels), LocalTraining(epochs, batch, 0.5), plan, histories[i], seed=rnd
            )
            histories[i] = out.history
        ours = time.perf_counter() - t0 + (extraction if rnd == 1 else 0.0)
        usual = sum(
            usual_round(
                backbone,
                images,
                labels,
                make_head(backbone.feature_dim, 10).to(backbone.device),
                epochs,
                batch,
                plan.noise_multiplier,
            )
            for images, labels in data
        )
        rows.append({"image_px": size, "round": rnd, "fedtransfer_s": ours, "usual_s": usual, "speedup": usual / ours})
    total_ours, total_usual = sum(r["fedtransfer_s"] for r in rows), sum(r["usual_s"] for r in rows)
    rows.append(
        {
            "image_px": size,
            "round": "run",
            "fedtransfer_s": total_ours,
            "usual_s": total_usual,
            "speedup": total_usual / total_ours,
        }
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64], help="full size: 64 224")
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--samples", type=int, default=128, help="training samples per site")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2, help="local epochs per round")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto (features and training on that device)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    rows = [
        r | {"device": device}
        for s in args.sizes
        for r in run(s, args.sites, args.samples, args.rounds, args.epochs, args.batch, device)
    ]
    print_table(rows, ["device", "image_px", "round", "fedtransfer_s", "usual_s", "speedup"])
    write_results("round_time" if device == "cpu" else f"round_time_{device}", rows, vars(args))


if __name__ == "__main__":
    main()
