"""Empirical ε lower bound against the claimed ε, for several targets and for training without noise.

Runs the empirical test of `fedtransfer audit --empirical` (server/audit/empirical.py) on one
simulated site of a config: the site's own training procedure and DP plan over every round,
with canaries, attacked, bounded with the one-run method. Prints a table and writes
empirical_privacy.json into benchmarks/results/ (or $FEDTRANSFER_BENCH_RESULTS).

    .venv/bin/python -m benchmarks.empirical_privacy [--config configs/demo.yaml] [--canaries 1000]

Under distributed trust (configs/distributed.yaml) `--message own` attacks the site's message alone against
its own-message ε; the default attacks what the SecAgg+ sum shows against the aggregate's ε. Those write
empirical_privacy_distributed_{aggregate,own}.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import torch
from fedtransfer.common.config.run import load_config
from fedtransfer.server.audit.empirical import CanarySettings, audit_training, simulated_sites, with_target

from benchmarks.harness import results_dir

COLUMNS = (
    "target ε",
    "claimed ε",
    "noise multiplier",
    "ε lower bound",
    "correct/guesses",
    "largest provable",
    "seconds",
)


def _row(target: float | None, result: Any, seconds: float) -> dict[str, Any]:
    """One line of the table; `claimed ε` is the accountant's ε of this very training."""
    return {
        "target ε": "none (no noise, no clipping)" if target is None else f"{target:g}",
        "claimed ε": "–" if result.claimed_epsilon is None else f"{result.claimed_epsilon:.3f}",
        "noise multiplier": "none" if result.noise_multiplier is None else f"{result.noise_multiplier:.3f}",
        "ε lower bound": f"{result.eps_lower_bound:.3f}",
        "correct/guesses": f"{result.num_correct}/{result.num_guesses}",
        "largest provable": f"{result.eps_ceiling:.3f}",
        "seconds": f"{seconds:.1f}",
        "result": {k: v for k, v in vars(result).items() if k not in ("scores_in", "scores_out")},
    }


def _params(args: argparse.Namespace, cfg: Any, site: Any, settings: CanarySettings) -> dict[str, Any]:
    """What the run measured: the config's training and privacy settings, the site's size, the canaries."""
    return {
        "config": args.config,
        "site": args.site,
        "training_samples": len(site.labels),
        "feature_dim": int(site.features.shape[1]),
        "rounds": cfg.train.rounds,
        "local_epochs": cfg.train.local_epochs,
        "batch_size": cfg.train.batch_size,
        "delta": cfg.privacy.target_delta,
        "accountant": cfg.privacy.accountant,
        "trust": cfg.privacy.trust,
        "message": args.message,
        "num_canaries": settings.num_canaries,
        "confidence": settings.confidence,
        "guess_counts": settings.guess_counts,
        "seed": settings.seed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml", help="run config (default: configs/demo.yaml)")
    parser.add_argument("--site", default="site-0", help="which simulated site's data (default: site-0)")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--message",
        choices=("aggregate", "own"),
        default="aggregate",
        help="distributed trust: attack the SecAgg+ sum (default) or the site's own message, each against its claim",
    )
    args = parser.parse_args()
    cfg = load_config(args.config)
    settings = CanarySettings(args.canaries, args.confidence, args.seed)
    sites = {s.name: s for s in simulated_sites(cfg)}
    if args.site not in sites:
        parser.error(f"--site {args.site}: the config has sites {sorted(sites)}")
    site = sites[args.site]
    rows = []
    for epsilon in [*args.epsilons, None]:
        start = time.perf_counter()
        if epsilon is None:  # noise off, clipping off: what a broken DP implementation would release
            result = audit_training(
                site.features, site.labels, site.num_classes, cfg, settings, private=False, message=args.message
            )
        else:
            result = audit_training(
                site.features, site.labels, site.num_classes, with_target(cfg, epsilon), settings, message=args.message
            )
        rows.append(_row(epsilon, result, time.perf_counter() - start))
    widths = [max(len(c), *(len(r[c]) for r in rows)) for c in COLUMNS]
    print("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True)))
    for r in rows:
        print("  ".join(r[c].ljust(w) for c, w in zip(COLUMNS, widths, strict=True)))
    params = _params(args, cfg, site, settings)
    machine = {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    name = "empirical_privacy" if cfg.privacy.trust == "local" else f"empirical_privacy_distributed_{args.message}"
    result = results_dir() / f"{name}.json"  # a distributed run's two claims keep files of their own
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps({"params": params, "machine": machine, "rows": rows}, indent=2, ensure_ascii=False))
    print(f"written: {result}")


if __name__ == "__main__":
    main()
