"""Accuracy, balanced accuracy and AUROC against ε on the text and tabular demos (any run config, in fact).

For a config (default configs/bank-text.yaml): the configured encoder embeds the configured data
once (cached); 20% is held out as the test set; the rest is split over 1, 4 and 16 sites, IID and
Dirichlet(data.alpha), and federated with the app's own DP head training (benchmarks.harness.federate:
fedtransfer.common.privacy.dp_sgd + Flower's weighted aggregation) at ε in {1, 3, 8} and without DP, with the
config's train.* settings. Beside it, the non-private centralised probe: scikit-learn's logistic
regression on the same L2-normalised features of the whole training pool, the ceiling a federation
could reach. Every row is the mean of --seeds runs.

    .venv/bin/python -m benchmarks.modalities [--config configs/bank-text.yaml] [--sites 1 4 16]
        [--seeds 1] [--results-dir DIR]

Writes modalities_<run_name>.json to the results folder ($FEDTRANSFER_BENCH_RESULTS, or
benchmarks/results/; --results-dir overrides both).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from fedtransfer.common.config.run import RunConfig, load_config
from fedtransfer.common.data.federation import partition_dirichlet, partition_iid, split_holdout
from fedtransfer.common.data.sources import Samples, load_source
from fedtransfer.common.encoders.feature_cache import cached_features
from fedtransfer.common.encoders.registry import load_encoder, resolve_device
from fedtransfer.common.model.head import FEATURE_SCALE, macro_auroc
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score

from benchmarks.harness import RESULTS_ENV, FedSetup, federate, print_table, write_results

EPSILONS: list[float | None] = [1.0, 3.0, 8.0, None]
METRICS = ("accuracy", "balanced_accuracy", "auroc")


class Task:
    """The config's data, embedded once by its encoder, split into a training pool and a test set."""

    def __init__(self, cfg: RunConfig) -> None:
        d = cfg.data
        pool = load_source(
            d.source, d.path, cfg.backbone.image_size, cfg.backbone.schema, (d.text_column, d.label_column)
        )
        if d.max_samples is not None and d.max_samples < len(pool):
            pool = pool.subset(np.sort(np.random.default_rng(cfg.seed).permutation(len(pool))[: d.max_samples]))
        encoder = load_encoder(cfg.backbone, resolve_device(cfg.device))
        t0 = time.monotonic()
        features, computed = cached_features(encoder, pool, cfg.cache_path)
        self.embed_s = time.monotonic() - t0 if computed else None
        train, test = split_holdout(len(pool), 0.2, seed=0)
        self.encoder, self.classes, self.alpha = encoder.name, pool.classes, d.alpha
        self.train: Samples = pool.subset(train)
        self.f_train, self.f_test = features[train], features[test]
        self.y_train, self.y_test = torch.from_numpy(pool.labels[train]), torch.from_numpy(pool.labels[test])

    def parts(self, sites: int, split: str, seed: int) -> list[np.ndarray]:
        labels = self.train.labels
        if split == "iid":
            return partition_iid(labels, sites, seed)
        return partition_dirichlet(labels, sites, self.alpha, seed)

    def probe(self) -> dict[str, float | None]:
        """The non-private centralised ceiling: logistic regression on the same normalised features."""

        def norm(x: torch.Tensor) -> np.ndarray:
            return (torch.nn.functional.normalize(x, dim=1) * FEATURE_SCALE).numpy()

        clf = LogisticRegression(max_iter=3000).fit(norm(self.f_train), self.y_train.numpy())
        probs = np.zeros((len(self.y_test), len(self.classes)))
        probs[:, clf.classes_] = clf.predict_proba(norm(self.f_test))
        truth = self.y_test.numpy()
        return {
            "accuracy": float((probs.argmax(1) == truth).mean()),
            "balanced_accuracy": float(balanced_accuracy_score(truth, probs.argmax(1))),
            "auroc": macro_auroc(truth, probs),
        }


def sweep(task: Task, setup: FedSetup, site_counts: list[int], seeds: int) -> list[dict]:
    """One row per (split, sites, ε): the mean over seeds of each metric, and the probe's beside it."""
    probe = task.probe()
    rows = [{"split": "centralised", "sites": 1, "epsilon": "none (probe)", **probe}]
    for split in ("iid", "dirichlet"):
        for sites in site_counts:
            if split == "dirichlet" and sites == 1:
                continue  # one site holds everything: the same as IID
            for eps in EPSILONS:
                runs = []
                for seed in range(seeds):
                    parts = task.parts(sites, split, seed)
                    data = [(task.f_train[p], task.y_train[p]) for p in parts]
                    runs.append(
                        federate(
                            data,
                            (task.f_test, task.y_test),
                            len(task.classes),
                            replace(setup, target_epsilon=eps),
                            seed=seed,
                        )
                    )
                row = {"split": split, "sites": sites, "epsilon": "none" if eps is None else eps}
                for m in METRICS:
                    values = [r[m] for r in runs if r[m] is not None]
                    row[m] = float(np.mean(values)) if values else None
                row["epsilon_spent"] = max(r["epsilon"] for r in runs)
                row["auroc_gap_to_probe"] = None if row["auroc"] is None else probe["auroc"] - row["auroc"]
                rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/bank-text.yaml", help="run config whose encoder and data to use")
    parser.add_argument("--sites", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seeds", type=int, default=1, help="runs averaged per row")
    parser.add_argument("--max-samples", type=int, default=None, help="cap the data (smoke runs)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the head training")
    parser.add_argument("--results-dir", help=f"where the JSON goes (default ${RESULTS_ENV} or benchmarks/results)")
    args = parser.parse_args()
    if args.results_dir:
        os.environ[RESULTS_ENV] = str(Path(args.results_dir).expanduser())
    warnings.filterwarnings("ignore")
    cfg = load_config(args.config)
    if args.max_samples:
        cfg = replace(cfg, data=replace(cfg.data, max_samples=args.max_samples))
    task = Task(cfg)  # feature extraction: all cores
    torch.set_num_threads(args.threads)
    t = cfg.train
    setup = FedSetup(
        rounds=t.rounds,
        local_epochs=t.local_epochs,
        batch_size=t.batch_size,
        learning_rate=t.learning_rate,
        target_delta=cfg.privacy.target_delta,
        max_grad_norm=cfg.privacy.max_grad_norm,
        accountant=cfg.privacy.accountant,
        momentum=t.momentum,
    )
    t0 = time.monotonic()
    rows = sweep(task, setup, args.sites, args.seeds)
    took = time.monotonic() - t0
    print(
        f"{task.encoder} on {cfg.data.source} {cfg.data.path or ''}: {len(task.y_train)} training / "
        f"{len(task.y_test)} test records, {len(task.classes)} classes; sweep {took:.0f}s"
    )
    print_table(rows, ["split", "sites", "epsilon", *METRICS, "epsilon_spent", "auroc_gap_to_probe"])
    params = vars(args) | {"encoder": task.encoder, "embed_seconds": task.embed_s, "setup": setup.__dict__}
    write_results(f"modalities_{cfg.run_name}", rows, params)


if __name__ == "__main__":
    main()
