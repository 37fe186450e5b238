"""Secure aggregation's price: round time and bytes per site, SecAgg+ against plain FedAvg.

For each number of sites, the same federation (MNIST, IID, DP on, 32 px) runs twice on the
real Simulation Engine, plain and with `secure_aggregation: true`, side by side in one
process run. Round 1 carries the one-off feature extraction, so the table reports the
mean of the later rounds. Bytes are what a site sends per round: in plain mode its head
tensors; under SecAgg+ every protocol stage (public keys, encrypted key shares, the masked
vector, the unmasking shares), as the server measured them.

With the default `secagg.num_shares: 1.0` every site is every site's neighbour (plain SecAgg,
quadratic in the sites); `--num-shares K` gives each site K neighbours (SecAgg+'s point) with
`--threshold` of them needed to reconstruct.

    .venv/bin/python -m benchmarks.secure_aggregation [--sites 3 10] [--rounds 3]    # the docs: --sites 3 10 50
    .venv/bin/python -m benchmarks.secure_aggregation --sites 50 --num-shares 11 --threshold 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from fedtransfer.common.config.run import config_from_dict
from fedtransfer.server.launch.simulation import simulate

from benchmarks.harness import print_table, write_results


def run(sites: int, secure: bool, rounds: int, workdir: Path, secagg: dict[str, float]) -> dict:
    mode = "secagg" if secure else "plain"
    cfg = config_from_dict(
        {
            "run_name": f"secagg-{sites}-{mode}",
            "output_dir": str(workdir / f"{sites}-{mode}"),
            "cache_dir": str(workdir / "cache"),
            "backbone": {"image_size": 32},
            "data": {"num_sites": sites, "split": "iid"},
            "train": {
                "rounds": rounds,
                "local_epochs": 2,
                "fraction_evaluate": 0.0,
                "min_sites": 2,
                "protocol": "fedavg",
                "learning_rate": 0.5,
            },  # as measured: SecAgg+ over the sites' heads
            "privacy": {"feature_stats": False, "accountant": "rdp"},
            "secure_aggregation": secure,
            "secagg": secagg,
        }
    )
    simulate(cfg, stream=False)
    records = [json.loads(line) for line in (cfg.output_path / "metrics.jsonl").read_text().splitlines()]
    later = records[1:] or records
    sent = [s["bytes_sent"] for r in later for s in r["sites"].values() if s.get("status") == "trained"]
    return {
        "sites": sites,
        "mode": mode,
        "num_shares": cfg.secagg.num_shares if secure else None,
        "threshold": cfg.secagg.reconstruction_threshold if secure else None,
        "round_s": statistics.mean(r["time_s"] for r in later),
        "round1_s": records[0]["time_s"],
        "bytes_per_site": statistics.mean(sent),
        "sites_trained": min(r["sites_trained"] for r in records),
        "accuracy": records[-1]["server"]["accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 10], help="docs: 3 10 50 (about 3 min)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-shares", type=float, default=None, help="secagg.num_shares (default: the config's)")
    parser.add_argument("--threshold", type=float, default=None, help="secagg.reconstruction_threshold")
    args = parser.parse_args()
    secagg = {
        k: v
        for k, v in (("num_shares", args.num_shares), ("reconstruction_threshold", args.threshold))
        if v is not None
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedtransfer-secagg-") as tmp:
        for sites in args.sites:
            plain = run(sites, False, args.rounds, Path(tmp), secagg)
            secure = run(sites, True, args.rounds, Path(tmp), secagg)
            secure["time_ratio"] = secure["round_s"] / plain["round_s"]
            secure["bytes_ratio"] = secure["bytes_per_site"] / plain["bytes_per_site"]
            rows += [plain, secure]
            print_table(
                rows,
                [
                    "sites",
                    "mode",
                    "num_shares",
                    "threshold",
                    "round_s",
                    "round1_s",
                    "time_ratio",
                    "bytes_per_site",
                    "bytes_ratio",
                    "sites_trained",
                    "accuracy",
                ],
            )
            print()
    name = "secure_aggregation" if not secagg else "secure_aggregation_neighbours"
    write_results(name, rows, vars(args))


if __name__ == "__main__":
    main()
