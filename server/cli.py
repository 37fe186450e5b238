"""The `fedtransfer` command: simulate, predict, audit, deploy.

User errors end with one line on stderr and exit status 2; no tracebacks.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _simulate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from common.config import RunConfig, load_config
    from server.simulation import simulate

    cfg = load_config(args.config) if args.config else RunConfig()
    if args.output:
        cfg = replace(cfg, output_dir=args.output)
    if args.resume:
        cfg = replace(cfg, resume=True)
    status = simulate(cfg, stream=not args.quiet)
    print(f"fedtransfer: run {status['run_id']} completed; server hold-out accuracy {status['final_accuracy']:.4f}")
    print(
        f"fedtransfer: outputs in {cfg.output_path} (metrics.jsonl, privacy.json, model.pt, accuracy.png, epsilon.png)"
    )
    return 0


def _predict(args: argparse.Namespace) -> int:
    from common.data import IMAGE_SUFFIXES, DataError
    from server.export import load_model

    model = load_model(args.model)
    size = model.preprocess.image_size
    target = Path(args.images)
    files = sorted(p for p in target.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if target.is_dir() else [target]
    if not files or not files[0].exists():
        raise DataError(f"{target}: no images found (suffixes {sorted(IMAGE_SUFFIXES)})")
    from PIL import Image, UnidentifiedImageError

    for start in range(0, len(files), 64):
        batch, names = [], files[start : start + 64]
        for f in names:
            try:
                with Image.open(f) as img:
                    batch.append(np.asarray(img.convert("RGB").resize((size, size)), dtype=np.uint8))
            except (UnidentifiedImageError, OSError) as err:
                raise DataError(f"{f}: cannot read image ({type(err).__name__})") from None
        for f, label in zip(names, model.predict(np.stack(batch)), strict=True):
            print(f"{f}\t{label}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtransfer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a federation on Flower's Simulation Engine")
    sim.add_argument("--config", help="YAML config (default: the embedded demo, see configs/demo.yaml)")
    sim.add_argument("--output", help="override output_dir")
    sim.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    sim.add_argument("--quiet", action="store_true", help="do not stream the run's log")
    sim.set_defaults(func=_simulate)
    pred = sub.add_parser("predict", help="classify an image or a folder of images with an exported model")
    pred.add_argument("model", help="model.pt written by a run")
    pred.add_argument("images", help="an image file or a folder (searched recursively)")
    pred.set_defaults(func=_predict)
    from server.audit import add_audit_parser

    add_audit_parser(sub)
    from deploy.cli import add_deploy_parser  # init, superlink, register, site, run

    add_deploy_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from common.backbones import BackboneError
    from common.config import ConfigError
    from common.data import DataError
    from deploy.cli import DeployError
    from deploy.credentials import CredentialsError
    from server.simulation import SimulationError

    try:
        return args.func(args)
    except (ConfigError, DataError, BackboneError, SimulationError, CredentialsError, DeployError, ValueError) as err:
        print(f"fedtransfer: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedtransfer: interrupted; checkpoints written so far are intact (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
