"""`fedtransfer simulate`: a run on Flower's Simulation Engine, its outcome and each site's own scores."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any


def add_simulate_parser(sub: Any) -> None:
    """Register `fedtransfer simulate` on the top-level parser's subparsers."""
    sim = sub.add_parser("simulate", help="run a federation on Flower's Simulation Engine")
    sim.add_argument("--config", help="YAML config (default: the embedded demo, see configs/demo.yaml)")
    sim.add_argument("--output", help="override output_dir")
    sim.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    sim.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        help="run the sites on this existing Ray cluster (its "
        "head); output_dir and cache_dir must be on storage every node mounts",
    )
    shown = sim.add_mutually_exclusive_group()
    shown.add_argument("--quiet", action="store_true", help="print only the outcome (the log is in run.log)")
    shown.add_argument("--verbose", action="store_true", help="print every log line of Flower, Ray and the ServerApp")
    sim.set_defaults(func=simulate_command)


def simulate_command(args: argparse.Namespace) -> int:
    """Run the config; print the outcome, then each site's alone, global and final score on its own test split."""
    from fedtransfer.client.site_model.report import summary_lines as collaboration_lines
    from fedtransfer.common.config.run import RunConfig, load_config
    from fedtransfer.common.model.intervals import described_accuracy
    from fedtransfer.server.launch.simulation import simulate

    cfg = load_config(args.config) if args.config else RunConfig()
    if args.output:
        cfg = replace(cfg, output_dir=args.output)
    if args.resume:
        cfg = replace(cfg, resume=True)
    status = simulate(cfg, stream=not args.quiet, verbose=args.verbose, ray_address=args.ray_address)
    held_out = described_accuracy(status["final_accuracy"], status.get("final_metrics"))  # with interval, records
    print(f"fedtransfer: run {status['run_id']} completed; server hold-out accuracy {held_out}")
    for line in collaboration_lines(cfg.output_path / "sites", str(status["run_id"])):
        print(f"fedtransfer: {line}")
    print(
        f"fedtransfer: outputs in {cfg.output_path} (run.log, metrics.jsonl, privacy.json, model.pt, accuracy.png, "
        "epsilon.png)"
    )
    return 0
