"""Scale: many simulated sites on this machine, through the real Flower Simulation Engine.

For each number of sites, one `fedtransfer simulate` run (MNIST, IID, DP on): time per round
(from metrics.jsonl), whole-run wall time, and peak memory of the machine above the baseline
(sampled from /proc/meminfo every 0.2 s, so other load on the machine counts too).

    .venv/bin/python -m benchmarks.scale [--sites 10 100 500] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.harness import print_table, write_results
from common.config import config_from_dict
from server.simulation import simulate


def _used_bytes() -> int:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    kib = int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])
    return kib * 1024


class PeakMemory:
    """Peak of machine-wide used memory while the block runs, minus what was used before."""

    def __enter__(self) -> PeakMemory:
        self.base = self.peak = _used_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, _used_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def delta_gib(self) -> float:
        return (self.peak - self.base) / 2**30


def run(sites: int, rounds: int, image_size: int, workdir: Path) -> dict:
    cfg = config_from_dict(
        {
            "run_name": f"scale-{sites}",
            "output_dir": str(workdir / f"sites-{sites}"),
            "cache_dir": str(workdir / "cache"),
            "backbone": {"image_size": image_size},
            "data": {"num_sites": sites, "split": "iid", "site_test_fraction": 0.2},
            "train": {"rounds": rounds, "local_epochs": 1, "min_sites": 1, "fraction_evaluate": 0.0},
            "privacy": {"target_delta": 1e-5},
        }
    )
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        status = simulate(cfg, stream=False)
    wall = time.perf_counter() - t0
    metrics = [json.loads(line) for line in (cfg.output_path / "metrics.jsonl").read_text().splitlines()]
    per_round = [m["time_s"] for m in metrics]
    return {
        "sites": sites,
        "round_1_s": per_round[0],
        "later_round_s": sum(per_round[1:]) / max(1, len(per_round) - 1),
        "per_site_later_round_ms": 1000 * sum(per_round[1:]) / max(1, len(per_round) - 1) / sites,
        "wall_s": wall,
        "peak_mem_gib": mem.delta_gib,
        "accuracy": status["final_accuracy"],
        "sites_trained_last_round": metrics[-1]["sites_trained"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 100, 500])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedtransfer-scale-") as tmp:
        rows = [run(n, args.rounds, args.image_size, Path(tmp)) for n in args.sites]
    print_table(rows, list(rows[0]))
    write_results("scale", rows, vars(args))


if __name__ == "__main__":
    main()
