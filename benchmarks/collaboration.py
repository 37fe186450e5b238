"""Does joining pay? Each site's own-test and others'-data scores: alone, the global DP model, its final model, pooled.

For every site of a federation, side by side, on the site's own test split and on the other sites' test splits
pooled: `alone` (a logistic regression on its own cached features, non-private, regularisation chosen on a
validation split of its training split), `global` (the federation's DP model, the config's protocol), `final`
(what the site keeps: client/site_model/final.py's choice among alone, global and the global model fine-tuned on its
records) and `pooled` (the same logistic regression on all sites' training splits, non-private: the ceiling).

Federations (the app's own split, `federation_for`, of each config):
- `demo`: configs/demo.yaml (4 sites, Dirichlet(0.5)); `iid4`, `iid16`: the same pool IID over 4 or 16 sites;
  `dirichlet`: Dirichlet(0.3) over 4 sites; `small`: IID over 8 sites whose training splits are cut to 50-200
  records; `bank`: configs/bank-tabular.yaml (4 banks, ISLR Default); `text`: configs/bank-text.yaml (4 offices,
  BBC News, MiniLM sentence embeddings, Dirichlet(0.5)). AUROC is the bank's and the text's score (macro
  one-vs-rest for the text's 5 desks), accuracy the images'.
The global model is trained in-process on cached features with the sites' own code (benchmarks/harness.py,
benchmarks/privacy_utility.py): fedsgd with feature statistics as configs/demo.yaml, or fedavg as the bank's config.
Each seed changes the DP noise, the initialisation and the site's validation split; the data split is fixed.
Mean ± standard error over the seeds.

    .venv/bin/python -m benchmarks.collaboration [--federations demo dirichlet ...] [--epsilons 1 3 8]
        [--seeds 0 1 2] [--quick] [--name collaboration]
"""

from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from fedtransfer.client.site_model.final import (
    ALONE_C,
    Tuning,
    choose_final,
    fit_alone,
    record_losses,
    validation_split,
)
from fedtransfer.common.config.run import RunConfig, load_config
from fedtransfer.common.data.federation import federation_for
from fedtransfer.common.encoders.feature_cache import cached_features
from fedtransfer.common.encoders.registry import load_encoder
from fedtransfer.common.model.head import evaluate_head
from torch import nn

from benchmarks.distributed_trust import Setting, federate_distributed_model
from benchmarks.harness import FedSetup, federate_model, print_table, results_dir, write_results
from benchmarks.privacy_utility import SGDSetup, federate_sgd_model

Data = tuple[torch.Tensor, torch.Tensor]
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL_SIZES = (50, 70, 90, 110, 130, 150, 175, 200)  # the small federation's training records per site
MODELS = ("alone", "global", "final", "pooled")


@dataclass(frozen=True)
class Federation:
    name: str
    cfg: RunConfig
    train: list[Data]
    test: list[Data]  # each site's own test split
    classes: int
    score: str  # "accuracy", or "auroc" for a binary table


AUROC_FEDERATIONS = {"bank": "bank-tabular.yaml", "text": "bank-text.yaml"}  # scored on AUROC, as the issue asks


def _config(name: str) -> RunConfig:
    if name in AUROC_FEDERATIONS:
        return load_config(CONFIGS / AUROC_FEDERATIONS[name])
    cfg = load_config(CONFIGS / "demo.yaml")
    split = {"iid4": ("iid", 4), "iid16": ("iid", 16), "dirichlet": ("dirichlet", 4), "small": ("iid", 8)}
    if name in split:
        kind, sites = split[name]
        cfg = replace(cfg, data=replace(cfg.data, split=kind, num_sites=sites, alpha=0.3))
    return cfg


def load_federation(name: str, cache: Path) -> Federation:
    """The federation's sites as cached features: training and own test split of each."""
    cfg = _config(name)
    fed, encoder = federation_for(cfg), load_encoder(cfg.backbone, "cpu")

    def feats(samples) -> Data:
        return cached_features(encoder, samples, cache)[0].float(), torch.from_numpy(samples.labels).long()

    train, test = [feats(s.train) for s in fed.sites], [feats(s.test) for s in fed.sites]
    if name == "small":  # a random cut of each site's training split (its test split stays whole)
        rng = np.random.default_rng(0)
        train = [
            (x[idx], y[idx])
            for (x, y), n in zip(train, SMALL_SIZES, strict=True)
            for idx in [torch.from_numpy(np.sort(rng.permutation(len(y))[:n]))]
        ]
    classes = len(fed.sites[0].test.classes)
    score = "auroc" if classes == 2 or name in AUROC_FEDERATIONS else "accuracy"
    return Federation(name, cfg, train, test, classes, score)


def global_model(fed: Federation, eps: float, seed: int, trust: str = "local") -> nn.Module:
    """The federation's DP model at ε, trained as its config says (fedsgd with statistics, or fedavg).

    `trust: distributed` trains it as configs/distributed.yaml does (Skellam noise shares summed under SecAgg+,
    benchmarks/distributed_trust.py), with the config's rounds, learning rate and statistics share: fedsgd only.
    """
    t, p = fed.cfg.train, fed.cfg.privacy
    if trust == "distributed":
        share = p.feature_stats_share if p.feature_stats else None
        setting = Setting(t.rounds, t.learning_rate, share)
        return federate_distributed_model(fed.train, fed.classes, eps, seed, setting)[0]
    if t.protocol == "fedsgd":
        share = p.feature_stats_share if p.feature_stats else None
        setup = SGDSetup(t.rounds, t.sample_rate, t.learning_rate, t.server_momentum, share, p.accountant)
        return federate_sgd_model(fed.train, fed.classes, setup, eps, seed)[0]
    setup = FedSetup(
        t.rounds, t.local_epochs, t.batch_size, t.learning_rate, eps, p.target_delta, accountant=p.accountant
    )
    return federate_model(fed.train, fed.classes, setup, seed)[0]


def pooled_model(fed: Federation, seed: int) -> nn.Module:
    """The non-private ceiling: one logistic regression on all sites' training splits, C chosen on 20% of them."""
    x, y = torch.cat([x for x, _ in fed.train]), torch.cat([y for _, y in fed.train])
    fit, val = validation_split(y, seed)

    def loss(c: float) -> float:
        return float(record_losses(fit_alone(x[fit], y[fit], fed.classes, c), x[val], y[val])[0].mean())

    best = min(ALONE_C, key=loss)
    return fit_alone(x, y, fed.classes, best)


def _score(model: nn.Module, data: Data, score: str) -> float:
    s = evaluate_head(model, *data)
    return float(s.auroc if score == "auroc" and s.auroc is not None else s.accuracy)


def site_rows(
    fed: Federation, eps: float, seed: int, pooled: nn.Module, tuning: Tuning, trust: str = "local"
) -> list[dict]:
    """One row per site: each model's score on its own test split and on the other sites' test splits."""
    glob = global_model(fed, eps, seed, trust)
    rows = []
    for i, (x, y) in enumerate(fed.train):
        final = choose_final(glob, x, y, fed.classes, replace(tuning, seed=seed * 1000 + i))
        others = [t for j, t in enumerate(fed.test) if j != i]
        rest = (torch.cat([t[0] for t in others]), torch.cat([t[1] for t in others]))
        models = {"alone": final.alone, "global": glob, "final": final.model, "pooled": pooled}
        row = {"federation": fed.name, "trust": trust, "epsilon": eps, "seed": seed, "site": i, "train": len(y)}
        row |= {"test": len(fed.test[i][1]), "chosen": final.chosen, "score": fed.score}
        for name, model in models.items():
            row[f"{name}_own"] = _score(model, fed.test[i], fed.score)
            row[f"{name}_others"] = _score(model, rest, fed.score)
        rows.append(row)
    return rows


def summarise(raw: list[dict]) -> list[dict]:
    """Mean and standard error over the seeds of each (federation, trust, ε, site), with the gains of final over
    alone."""

    def key(r: dict) -> tuple:
        return r["federation"], r.get("trust", "local"), r["epsilon"], r["site"]

    out = []
    for fed, trust, eps, site in sorted({key(r) for r in raw}):
        rs = [r for r in raw if key(r) == (fed, trust, eps, site)]
        row = {"federation": fed, "trust": trust, "epsilon": eps, "site": site}
        row |= {"train": rs[0]["train"], "test": rs[0]["test"]}
        row |= {"score": rs[0]["score"], "seeds": len(rs)}
        cols = [f"{m}_{w}" for w in ("own", "others") for m in MODELS]
        for col in [*cols, "gain_own", "gain_others"]:
            if col.startswith("gain"):
                where = col.split("_")[1]
                values = np.array([r[f"final_{where}"] - r[f"alone_{where}"] for r in rs])
            else:
                values = np.array([r[col] for r in rs])
            row[col] = float(values.mean())
            row[f"{col}_se"] = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
        row["chosen"] = ",".join(sorted(r["chosen"] for r in rs))
        out.append(row)
    return out


def plot(summary: list[dict], path: Path) -> None:
    """Final minus alone on the own test split (left) and on the others' data (right) against training records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for ax, where in zip(axes, ("own", "others"), strict=True):
        for fed, trust in sorted({(r["federation"], r.get("trust", "local")) for r in summary}):
            group = [r for r in summary if (r["federation"], r.get("trust", "local")) == (fed, trust)]
            rs = [r for r in group if r["epsilon"] == 3.0] or group
            ax.errorbar(
                [r["train"] for r in rs],
                [r[f"gain_{where}"] for r in rs],
                yerr=[r[f"gain_{where}_se"] for r in rs],
                fmt="o",
                label=f"{fed} ({trust})",
            )
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("site's training records")
        ax.set_ylabel(f"final - alone, {where} {'test split' if where == 'own' else 'sites data'}")
    axes[0].legend(fontsize=8)
    axes[0].set_title("ε = 3 (or the only ε run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--federations", nargs="+", default=["demo", "iid4", "dirichlet", "small", "iid16", "bank", "text"]
    )
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    trusts = "local: each site its own noise; distributed: noise shares under SecAgg+ (fedsgd federations only)"
    parser.add_argument("--trusts", nargs="+", default=["local"], choices=["local", "distributed"], help=trusts)
    parser.add_argument("--quick", action="store_true", help="smoke test: demo, ε = 3, one seed, 5 rounds, 30 steps")
    parser.add_argument("--name", default="collaboration", help="the results file: benchmarks/results/NAME.json")
    parser.add_argument("--cache", default="~/.cache/fedtransfer")
    args = parser.parse_args()
    if args.quick:
        args.federations, args.epsilons, args.seeds = ["demo"], [3.0], [0]
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    tuning = Tuning(steps=30 if args.quick else Tuning.steps)
    cache, raw = Path(args.cache).expanduser(), []
    for name in args.federations:
        started = time.perf_counter()
        fed = load_federation(name, cache)
        if args.quick:  # a smoke test: a global model of 5 rounds
            fed = replace(fed, cfg=replace(fed.cfg, train=replace(fed.cfg.train, rounds=5)))
        pooled = pooled_model(fed, 0)
        fedsgd = fed.cfg.train.protocol == "fedsgd"
        for trust in [t for t in args.trusts if fedsgd or t == "local"]:
            for eps in args.epsilons:
                for seed in args.seeds:
                    raw += site_rows(fed, eps, seed, pooled, tuning, trust)
        print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
        write_results(args.name, summarise(raw), {**vars(args), "raw": raw, "steps": tuning.steps})  # kept if cut
    summary = summarise(raw)
    columns = ["federation", "trust", "epsilon", "site", "train", "score"]
    columns += [f"{m}_{w}" for w in ("own", "others") for m in MODELS] + ["gain_own", "gain_own_se", "chosen"]
    print_table(summary, columns)
    write_results(args.name, summary, {**vars(args), "raw": raw, "steps": tuning.steps})
    plot(summary, results_dir() / f"{args.name}.png")


if __name__ == "__main__":
    main()
