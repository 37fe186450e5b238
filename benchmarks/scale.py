"""Scale: many simulated sites on this machine, through the real Flower Simulation Engine.

For each number of sites, one `fedtransfer simulate` run (MNIST, IID, DP on): time per round
(`time_s` in metrics.jsonl: the server's wall time for the round), whole-run wall time, peak
memory, and how much of a round is Flower/Ray overhead rather than training.

Overhead share of a round (rounds after the first, which also loads data and extracts features):
sites report `train-seconds` (the head's DP training, measured in the ClientApp) and the server
logs it per site as `train_s`. Ray runs up to W = min(sites, CPUs) ClientApps at once
(client-resources-num-cpus=1), so training alone, packed perfectly onto W workers, would take
sum(train_s) / W seconds. Everything else in the round is overhead (Flower messaging, Ray
scheduling, ClientApp bookkeeping: ledger, reply cache, audit log, the server's screening,
aggregation, evaluation, checkpoint and reports):

    overhead_share = 1 - sum(train_s) / (W * round_s)

The sites' audit logs time each ClientApp call (backbone-checked → update-sent), so the overhead is
split further: `clientapp_share` = (sum of ClientApp seconds - sum(train_s)) / (W * round_s) is the
app's own per-round work at the sites outside training (DP noise calibration, ε accounting, ledger,
reply cache, audit log); `flower_share` = overhead_share - clientapp_share is the rest: Flower/Ray
messaging and scheduling plus the server's in-round work (screening, audit log, aggregation,
hold-out evaluation, checkpoint). `between_rounds_s` is what time_s leaves out: from the server's
round-aggregated record to the first site starting the next round (privacy.json, metrics line,
next round's dispatch).

Peak memory: `tree_pss_gib` is the peak proportional set size summed over this process and every
process it started (SuperLink, `flwr run`, ServerApp, Ray and its workers), sampled every 0.5 s;
`machine_delta_gib` is machine-wide used memory above what was used before the run (other load on
the machine counts too). The growth exponents k (time or memory ∝ sites^k) are fitted between
consecutive site counts.

    .venv/bin/python -m benchmarks.scale [--sites 10 100 500] [--rounds 3]   (default: 10 100 sites)

On a Ray cluster (`fedtransfer simulate --ray-address`): `--ray-address HOST:PORT` runs every
simulation there, W is then the cluster's CPUs, and the results go to scale_cluster.json;
`--local-cluster N` starts a two-node cluster on loopback (a head with no CPU and a worker with
N CPUs, tests/ray_cluster.py) for the measurement and stops it afterwards. Output and cache
folders must be on storage every node sees (checked before each run).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from fedtransfer.common.config.run import config_from_dict
from fedtransfer.server.launch.simulation import simulate

from benchmarks.harness import print_table, write_results


def _used_bytes() -> int:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    kib = int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])
    return kib * 1024


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _tree_pss_bytes(root: int) -> int:
    total = 0
    for pid in _descendants(root):
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


class PeakMemory:
    """Peak memory while the block runs: of this process tree (PSS), and machine-wide above the start."""

    def __enter__(self) -> PeakMemory:
        self.base = self.peak = _used_bytes()
        self.tree_peak = _tree_pss_bytes(os.getpid())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, _used_bytes())
            self.tree_peak = max(self.tree_peak, _tree_pss_bytes(os.getpid()))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def delta_gib(self) -> float:
        return (self.peak - self.base) / 2**30

    @property
    def tree_gib(self) -> float:
        return self.tree_peak / 2**30


def _audit_times(run_dir: Path) -> tuple[dict[int, list[float]], dict[int, float], dict[int, float]]:
    """From the audit logs: per round, each site's ClientApp seconds (backbone-checked → update-sent),
    the earliest backbone-checked at any site, and the server's round-aggregated time (epoch seconds)."""
    clientapp: dict[int, list[float]] = {}
    first_start: dict[int, float] = {}
    for log in (run_dir / "sites").glob("*/audit.jsonl"):
        started: dict[int, float] = {}
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("message_type") != "train":
                continue
            t, rnd = datetime.fromisoformat(rec["time"]).timestamp(), rec["round"]
            if rec["event"] == "backbone-checked":
                started[rnd] = t
                first_start[rnd] = min(t, first_start.get(rnd, t))
            elif rec["event"] == "update-sent" and rnd in started:
                clientapp.setdefault(rnd, []).append(t - started[rnd])
    aggregated = {}
    for line in (run_dir / "audit.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["event"] == "round-aggregated":
            aggregated[rec["round"]] = datetime.fromisoformat(rec["time"]).timestamp()
    return clientapp, first_start, aggregated


def overhead(record: dict, workers: int, clientapp_s: list[float]) -> dict:
    """One round's time split: training, the ClientApp's other work, and Flower/Ray plus the server."""
    train = [s["train_s"] for s in record["sites"].values() if "train_s" in s]
    round_s = record["time_s"]
    share = 1.0 - sum(train) / (workers * round_s)
    app = (sum(clientapp_s) - sum(train)) / (workers * round_s) if clientapp_s else None
    return {
        "round_s": round_s,
        "train_sum_s": sum(train),
        "train_max_s": max(train, default=0.0),
        "clientapp_sum_s": sum(clientapp_s),
        "overhead_share": share,
        "clientapp_share": app,
        "flower_share": None if app is None else share - app,
    }


def run(
    sites: int, rounds: int, image_size: int, workdir: Path, ray_address: str | None = None, cpus: int | None = None
) -> dict:
    """One simulation of `sites` sites, locally or on the Ray cluster at `ray_address` (`cpus` CPUs)."""
    cfg = config_from_dict(
        {
            "run_name": f"scale-{sites}",
            "output_dir": str(workdir / f"sites-{sites}"),
            "cache_dir": str(workdir / "cache"),
            "backbone": {"image_size": image_size},
            "data": {"num_sites": sites, "split": "iid", "site_test_fraction": 0.2},
            "train": {
                "rounds": rounds,
                "local_epochs": 1,
                "min_sites": 1,
                "fraction_evaluate": 0.0,
                "protocol": "fedavg",
                "learning_rate": 0.5,
            },  # as measured: a head trained at every site
            "privacy": {"target_delta": 1e-5, "feature_stats": False, "accountant": "rdp"},
        }
    )
    workers = min(sites, cpus or os.cpu_count() or 1)  # Ray actors: one per CPU (client-resources-num-cpus=1)
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        status = simulate(cfg, stream=False, ray_address=ray_address)
    wall = time.perf_counter() - t0
    metrics = [json.loads(line) for line in (cfg.output_path / "metrics.jsonl").read_text().splitlines()]
    clientapp, first_start, aggregated = _audit_times(cfg.output_path)
    per_round = []
    for m in metrics:
        rnd = m["round"]
        r = {"round": rnd} | overhead(m, workers, clientapp.get(rnd, []))
        # after the round's time_s: the server's privacy.json, metrics line, then the next round's dispatch
        if rnd in aggregated and rnd + 1 in first_start:
            r["between_rounds_s"] = first_start[rnd + 1] - aggregated[rnd]
        per_round.append(r)
    later = per_round[1:] or per_round

    def mean(key: str) -> float | None:
        values = [r[key] for r in later if r.get(key) is not None and math.isfinite(r[key])]
        return sum(values) / len(values) if values else None

    return {
        "sites": sites,
        "workers": workers,
        "round_1_s": metrics[0]["time_s"],
        "later_round_s": mean("round_s"),
        "per_site_later_round_ms": 1000 * mean("round_s") / sites,
        "train_sum_s": mean("train_sum_s"),
        "train_max_s": mean("train_max_s"),
        "overhead_share": mean("overhead_share"),
        "clientapp_share": mean("clientapp_share"),
        "flower_share": mean("flower_share"),
        "between_rounds_s": mean("between_rounds_s"),
        "wall_s": wall,
        "tree_pss_gib": mem.tree_gib,
        "machine_delta_gib": mem.delta_gib,
        "accuracy": status["final_accuracy"],
        "sites_trained_last_round": metrics[-1]["sites_trained"],
        "per_round": per_round,
    }


def growth(rows: list[dict]) -> list[dict]:
    """Fitted exponent k (quantity ∝ sites^k) between consecutive site counts; k > 1 is superlinear."""
    out = []
    for a, b in itertools.pairwise(rows):
        scale = math.log(b["sites"] / a["sites"])
        out.append(
            {
                "from_sites": a["sites"],
                "to_sites": b["sites"],
                **{
                    f"k_{key}": math.log(b[key] / a[key]) / scale
                    for key in ("round_1_s", "later_round_s", "train_sum_s", "wall_s", "tree_pss_gib")
                    if a[key] and b[key] and a[key] > 0 and b[key] > 0
                },
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 100], help="full size: 10 100 500")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary folder)")
    cluster = parser.add_mutually_exclusive_group()
    cluster.add_argument("--ray-address", help="run on this existing Ray cluster (HOST:PORT of its head)")
    cluster.add_argument(
        "--local-cluster",
        type=int,
        metavar="CPUS",
        help="start a two-node loopback cluster whose worker has CPUS CPUs (the head none) and run on it",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedtransfer-scale-") as tmp, _cluster(args, Path(tmp)) as (address, cpus):
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        rows = [run(n, args.rounds, args.image_size, workdir, address, cpus) for n in args.sites]
    columns = [c for c in rows[0] if c != "per_round"]
    print_table(rows, columns)
    fits = growth(rows)
    if fits:
        print()
        print_table(fits, list(fits[0]))
    write_results("scale_cluster" if address else "scale", rows, vars(args) | {"growth": fits, "cluster_cpus": cpus})


@contextlib.contextmanager
def _cluster(args: argparse.Namespace, tmp: Path) -> Iterator[tuple[str | None, int | None]]:
    """(address, CPUs) of the cluster to run on: none, the one named, or a loopback one started here."""
    if args.local_cluster:
        from tests.ray_cluster import two_node_cluster

        with two_node_cluster(tmp / "ray", worker_cpus=args.local_cluster) as address:
            yield address, args.local_cluster
    elif args.ray_address:
        import ray

        ray.init(address=args.ray_address, logging_level="ERROR", log_to_driver=False)
        cpus = int(ray.cluster_resources().get("CPU", 0))
        ray.shutdown()
        yield args.ray_address, cpus
    else:
        yield None, None


if __name__ == "__main__":
    main()
