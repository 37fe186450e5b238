"""Does a binary model's decision threshold make it flag the rare class? The bank table at ε = 3, before and after.

On configs/bank-tabular.yaml (4 banks, ISLR Default, 3.3% defaults) the DP global model's probability of a
default stays low, and argmax (threshold 0.5) predicts a default for almost no held-out customer. This runs
the federation in-process on cached features with the sites' own code (as benchmarks/collaboration.py does),
then, per bank, what the run itself does after the last round: the final model (client/site_model/final.py) and
its threshold chosen on the same validation split (client/site_model/threshold.py, `personal.threshold`). Each model is
scored on the bank's own test split, which nothing chose on: records, positives, records predicted positive,
balanced accuracy with its 95% bootstrap interval (client/site_model/report.py), at argmax and at the threshold.
The server's hold-out row scores the global model at the threshold the run stores in model.pt: this config
releases no DP class counts (`privacy.feature_stats: false`), so it keeps 0.5 under balanced_accuracy.

    .venv/bin/python -m benchmarks.thresholds [--epsilon 3] [--seeds 0 1] [--rule balanced_accuracy]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from fedtransfer.client.site_model.final import Tuning, choose_final
from fedtransfer.client.site_model.report import probabilities, scored
from fedtransfer.client.site_model.threshold import site_threshold
from fedtransfer.common.config.finetune import threshold_rule
from fedtransfer.common.data.federation import federation_for
from fedtransfer.common.encoders.feature_cache import cached_features
from fedtransfer.common.encoders.registry import load_encoder
from fedtransfer.common.model.threshold import global_threshold

from benchmarks.collaboration import global_model, load_federation
from benchmarks.harness import print_table, write_results

COLUMNS = ["seed", "scored on", "model", "records", "positives", "threshold", "predicted +", "balanced acc [95%]"]


def _row(seed: int, where: str, model: str, truth: np.ndarray, probs: np.ndarray, threshold: float | None) -> dict:
    s = scored(truth, probs, seed=seed, threshold=threshold)
    b = s["balanced_accuracy"]
    return {
        "seed": seed,
        "scored on": where,
        "model": model,
        "records": s["records"],
        "positives": int((truth == 1).sum()),
        "threshold": round(s["threshold"], 4),
        "predicted +": s["predicted_positive"],
        "balanced acc [95%]": f"{b['value']:.3f} [{b['interval95'][0]:.3f}, {b['interval95'][1]:.3f}]",
        "balanced_accuracy": b["value"],
        "balanced_accuracy_interval95": b["interval95"],
    }


def seed_rows(fed, holdout: tuple[torch.Tensor, torch.Tensor], eps: float, seed: int, rule: str) -> list[dict]:
    """The server hold-out's row (global model) and each bank's rows: global and final, argmax and threshold."""
    glob = global_model(fed, eps, seed)
    print(f"seed {seed}: global model trained", flush=True)
    stored = global_threshold(threshold_rule(rule), None).value  # no DP class counts in this config
    hx, hy = holdout
    rows = [_row(seed, "server hold-out", "global (model.pt)", hy.numpy(), probabilities(glob, hx), stored)]
    for i, ((x, y), (tx, ty)) in enumerate(zip(fed.train, fed.test, strict=True)):
        tuning = Tuning(seed=seed * 1000 + i)
        final = choose_final(glob, x, y, fed.classes, tuning)
        t = site_threshold(final.model, x, y, rule_text=rule, seed=tuning.seed, num_classes=fed.classes)
        truth, where = ty.numpy(), f"bank {i} test"
        rows.append(_row(seed, where, "global, argmax", truth, probabilities(glob, tx), None))
        rows.append(_row(seed, where, f"final ({final.chosen}), argmax", truth, probabilities(final.model, tx), None))
        rows.append(_row(seed, where, "final, site threshold", truth, probabilities(final.model, tx), t.value))
        print(f"seed {seed}: bank {i} scored ({final.chosen}, threshold {t.value:.4f})", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rule", default="balanced_accuracy", help="personal.threshold: balanced_accuracy or cost:R")
    parser.add_argument("--cache", default=str(Path("~/.cache/fedtransfer").expanduser()))
    parser.add_argument("--name", default="thresholds_bank")
    args = parser.parse_args()
    threshold_rule(args.rule)  # a bad rule is one line before anything trains
    fed = load_federation("bank", Path(args.cache))
    cfg = fed.cfg
    encoder = load_encoder(cfg.backbone, "cpu")
    server = federation_for(cfg).server_test
    holdout = cached_features(encoder, server, Path(args.cache))[0].float(), torch.from_numpy(server.labels).long()
    t0 = time.monotonic()
    rows = [r for seed in args.seeds for r in seed_rows(fed, holdout, args.epsilon, seed, args.rule)]
    print_table(rows, COLUMNS)
    params = {"config": "configs/bank-tabular.yaml", "epsilon": args.epsilon, "seeds": args.seeds, "rule": args.rule}
    write_results(args.name, rows, params | {"seconds": round(time.monotonic() - t0, 1)})


if __name__ == "__main__":
    main()
