"""Shared pieces of the benchmarks: a table printer, JSON results, and an in-process federation.

The in-process federation runs the app's own site procedure (fedtransfer.common.privacy.dp_sgd.train_head with
fedtransfer.common.privacy.calibration.plan_dp on cached features) and Flower's own weighted aggregation
(`aggregate_arrayrecords`, what FedAvg calls), without Ray or a SuperLink, so that sweeps of
dozens of configurations finish in minutes. Round time with Flower in the loop is measured
separately (benchmarks/round_time.py, benchmarks/scale.py).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fedtransfer.common.model.head import evaluate_head, make_head
from fedtransfer.common.privacy.calibration import epsilon_of, plan_dp
from fedtransfer.common.privacy.dp_sgd import LocalTraining, train_head
from fedtransfer.common.privacy.events import History
from fedtransfer.common.wire.exchange import head_to_arrays, load_head
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from torch import nn

RESULTS_ENV = "FEDTRANSFER_BENCH_RESULTS"
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"  # the committed full-size runs


def results_dir() -> Path:
    """Where results are written: $FEDTRANSFER_BENCH_RESULTS when set (smoke runs, experiments), else
    benchmarks/results/, so a trial run never has to overwrite the committed results."""
    return Path(os.environ.get(RESULTS_ENV) or DEFAULT_RESULTS).expanduser()


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(columns, widths, strict=True)))


def write_results(name: str, rows: list[dict[str, Any]], params: dict[str, Any]) -> Path:
    """`name`.json in `results_dir()`: the rows, the parameters and the machine they were measured on."""
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    payload = {"benchmark": name, "machine": machine(), "params": params, "rows": rows, "time": time.time()}
    path.write_text(json.dumps(payload, indent=2))
    print(f"\nwritten: {path}")
    return path


@dataclass(frozen=True)
class FedSetup:
    rounds: int = 5
    local_epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 0.5
    target_epsilon: float | None = 3.0  # None: no DP
    target_delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"  # or "prv"
    momentum: float = 0.0


def federate(
    sites: list[tuple[torch.Tensor, torch.Tensor]],
    test: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    setup: FedSetup,
    seed: int = 0,
    make_model: Callable[[], nn.Module] | None = None,
) -> dict[str, float | None]:
    """FedAvg over sites' (inputs, labels) with each site's whole-run DP plan; returns final metrics.

    Inputs are backbone features for the fedtransfer head (the default model), or raw pixels
    for a from-scratch network passed as `make_model`.
    """
    head, eps = federate_model(sites, num_classes, setup, seed, make_model)
    scores = evaluate_head(head, *test).as_dict()  # accuracy, loss, balanced_accuracy, auroc (None: one class)
    return {**scores, "epsilon": eps if setup.target_epsilon is not None else float("inf")}


def federate_model(
    sites: list[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    setup: FedSetup,
    seed: int = 0,
    make_model: Callable[[], nn.Module] | None = None,
    on_round: Callable[[int, nn.Module], None] | None = None,
) -> tuple[nn.Module, float]:
    """The federation of `federate`: the final global model and the largest whole-run ε of a site.

    `on_round(round, global model)` runs after each aggregation (the sites' evaluation step).
    """
    make_model = make_model or (lambda: make_head(sites[0][0].shape[1], num_classes))
    torch.manual_seed(seed)
    head = make_model()
    arrays = head_to_arrays(head)
    histories: list[History] = [[] for _ in sites]
    eps = 0.0
    for rnd in range(setup.rounds):
        replies = []
        for i, (x, y) in enumerate(sites):
            local = make_model()
            load_head(local, arrays)
            plan = None
            if setup.target_epsilon is not None:
                plan = plan_dp(
                    num_samples=len(y),
                    batch_size=setup.batch_size,
                    local_epochs=setup.local_epochs,
                    rounds=setup.rounds,
                    target_epsilon=setup.target_epsilon,
                    target_delta=min(setup.target_delta, 0.5 / len(y)),
                    max_grad_norm=setup.max_grad_norm,
                    accountant=setup.accountant,
                )
            opts = LocalTraining(setup.local_epochs, setup.batch_size, setup.learning_rate, setup.momentum)
            out = train_head(local, x, y, opts, plan, histories[i], seed=seed * 10_000 + rnd * 100 + i)
            histories[i] = out.history
            if plan is not None and rnd == setup.rounds - 1:  # the whole run's ε, once
                eps = max(eps, epsilon_of(out.history, plan.target_delta, setup.accountant))
            replies.append(
                RecordDict({"arrays": head_to_arrays(local), "metrics": MetricRecord({"num-examples": len(y)})})
            )
        arrays = aggregate_arrayrecords(replies, "num-examples")
        if on_round is not None:
            load_head(head, arrays)
            on_round(rnd + 1, head)
    load_head(head, arrays)
    return head, eps


class SmallCNN(nn.Module):
    """The from-scratch baseline: a small CNN on raw 28×28 digits, GroupNorm (Opacus-compatible)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 5, stride=2, padding=2),
            nn.GroupNorm(4, 16),
            nn.Tanh(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.GroupNorm(4, 32),
            nn.Tanh(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(32 * 16, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
