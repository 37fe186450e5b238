"""Accuracy under distributed trust: DP-FedSGD with Skellam noise shares on the demo's 4 sites, at ε = 1 and 3.

Each site runs its own code (common.dp_fedsgd's per-record quantised clipped sum, common.skellam's share of
variance μ/K_min, μ from common.privacy.plan_distributed); the sites' integer sums are added as SecAgg+ adds
them (tests/test_distributed_trust.py shows the server reads back exactly this sum) and the server takes its
own step (server.strategy.server_step). Settings: configs/distributed.yaml (30 rounds, q = 1, lr 1, momentum
0.9, K_min = 3 of 4 sites). Test: the server's hold-out of 500, once per cell; mean ± sd over the seeds.

    .venv/bin/python -m benchmarks.distributed_trust [--seeds 0 1 2] [--epsilons 1 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.harness import print_table, write_results
from benchmarks.privacy_utility import DELTA, demo_split
from common.config import load_config
from common.dp_fedsgd import Units, clipped_gradient_sum
from common.head import evaluate_head, make_head
from common.privacy import epsilon_of, plan_distributed
from common.skellam import sample
from server.strategy import server_step

CONFIG = "configs/distributed.yaml"


def federate_distributed(sites: list, test: tuple, classes: int, eps: float, seed: int) -> dict:
    """One run: every site's quantised sum plus its Skellam share, summed, the server's step; accuracy and both ε."""
    cfg = load_config(CONFIG)
    t, survivors = cfg.train, cfg.secagg.fewest_survivors(cfg.train.min_sites)
    torch.manual_seed(seed)
    head = make_head(sites[0][0].shape[1], classes)
    dim = sum(p.numel() for p in head.parameters())
    gens = [torch.Generator().manual_seed(seed * 1000 + i) for i in range(len(sites))]
    plans = [plan_distributed(len(y), t.sample_rate, t.rounds, eps, min(DELTA, 0.5 / len(y)), 1.0, dim, survivors)
             for _, y in sites]  # fmt: skip
    frozen = frozenset(k for k, _ in head.named_buffers())
    velocity: dict = {}
    batch = sum(t.sample_rate * len(y) for _, y in sites)
    for _ in range(t.rounds):
        total: dict[str, np.ndarray] = {}
        for (x, y), p, g in zip(sites, plans, gens, strict=True):
            out = clipped_gradient_sum(head, x, y, Units.records(len(y)), t.sample_rate, p.max_grad_norm, g, p.quantum)
            for k, v in out.sums.items():
                noisy = v if k in frozen else v + sample(v.shape, p.noise_share, g, v.device)
                total[k] = total.get(k, 0.0) + noisy.numpy() * p.quantum
        weights = {k: v.detach().numpy() for k, v in head.state_dict().items()}
        weights, velocity = server_step(weights, total, velocity, batch, t.learning_rate, t.server_momentum, frozen)
        head.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in weights.items()})
    history = [[p.round_step] * t.rounds for p in plans]
    spent = max(epsilon_of(h, p.target_delta, "rdp") for h, p in zip(history, plans, strict=True))
    own = max(epsilon_of(h, p.target_delta, "rdp", individual=True) for h, p in zip(history, plans, strict=True))
    return {"accuracy": evaluate_head(head, *test).accuracy, "epsilon": spent, "epsilon_individual": own,
            "noise_multiplier": plans[0].noise_multiplier}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--cache", default=None, help="feature cache (default: the config's cache_dir)")
    args = parser.parse_args()
    cache = load_config(CONFIG).cache_path if args.cache is None else args.cache
    sites, _, test = demo_split(cache)
    classes = int(max(int(y.max()) for _, y in sites)) + 1
    rows = []
    for eps in args.epsilons:
        runs, started = [], time.monotonic()
        for seed in args.seeds:
            runs.append(federate_distributed(sites, test, classes, eps, seed))
        acc = [r["accuracy"] for r in runs]
        rows.append({"epsilon_target": eps, "accuracy_mean": float(np.mean(acc)), "accuracy_sd": float(np.std(acc)),
                     "epsilon_aggregate": runs[0]["epsilon"], "epsilon_individual": runs[0]["epsilon_individual"],
                     "noise_multiplier": runs[0]["noise_multiplier"],
                     "seconds_per_run": (time.monotonic() - started) / len(runs)})  # fmt: skip
    print_table(rows, ["epsilon_target", "accuracy_mean", "accuracy_sd", "epsilon_aggregate", "epsilon_individual",
                       "noise_multiplier", "seconds_per_run"])  # fmt: skip
    write_results("distributed_trust", rows, {"config": CONFIG, "seeds": args.seeds, "epsilons": args.epsilons})


if __name__ == "__main__":
    main()
