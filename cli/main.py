"""The `fedtransfer` command: simulate, predict, export, audit, deploy.

User errors (fedtransfer.common.errors.InputError, and the deployment's refusals) end with one line
on stderr and exit status 2, no traceback. Anything else is a bug: its traceback, exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

BATCH = 64  # images classified at once by `predict`


def _simulate(args: argparse.Namespace) -> int:
    from fedtransfer.client.collab_report import summary_lines as collaboration_lines
    from fedtransfer.common.config.run import RunConfig, load_config
    from fedtransfer.server.launch.simulation import simulate

    cfg = load_config(args.config) if args.config else RunConfig()
    if args.output:
        cfg = replace(cfg, output_dir=args.output)
    if args.resume:
        cfg = replace(cfg, resume=True)
    status = simulate(cfg, stream=not args.quiet, verbose=args.verbose, ray_address=args.ray_address)
    print(f"fedtransfer: run {status['run_id']} completed; server hold-out accuracy {status['final_accuracy']:.4f}")
    for line in collaboration_lines(cfg.output_path / "sites", str(status["run_id"])):
        print(f"fedtransfer: {line}")
    print(
        f"fedtransfer: outputs in {cfg.output_path} (run.log, metrics.jsonl, privacy.json, model.pt, accuracy.png, "
        "epsilon.png)"
    )
    return 0


def _image_files(target: Path) -> list[Path]:
    from fedtransfer.common.data.sources import IMAGE_SUFFIXES, DataError

    if not target.exists():
        raise DataError(f"{target}: no such file or folder; give an image or a folder of images")
    if target.is_dir():
        files = sorted(p for p in target.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        files = [target] if target.is_file() else []
    if not files:
        raise DataError(f"{target}: no images found (suffixes {sorted(IMAGE_SUFFIXES)})")
    return files


def _predict(args: argparse.Namespace) -> int:
    from fedtransfer.common.data.files import read_image  # the training loader's decoding: 16-bit scaling, same resize
    from fedtransfer.common.data.sources import DataError
    from fedtransfer.server.export.model_file import load_model

    model_path = Path(args.model)
    if not model_path.is_file():
        raise DataError(f"{model_path}: no such model file; pass the model.pt a run wrote into its output_dir")
    model = load_model(model_path)
    description = model.encoder.describe()
    if description.get("kind") == "tabular":  # a CSV of the declared columns, coded by the schema inside the model
        from fedtransfer.common.data.tables import read_table_inputs

        rows = read_table_inputs(Path(args.images), description)
        for start in range(0, len(rows), BATCH):
            for k, label in enumerate(model.predict(rows[start : start + BATCH]), start=start + 1):
                print(f"{k}\t{label}")
        return 0
    if description.get("kind") == "text":  # one text per line, or a CSV/JSONL column (--column)
        from fedtransfer.common.data.texts import read_text_inputs

        lines, texts = read_text_inputs(Path(args.images), args.column)
        for start in range(0, len(texts), BATCH):
            labels = model.predict(texts[start : start + BATCH])
            for line, label in zip(lines[start : start + BATCH], labels, strict=True):
                print(f"{line}\t{label}")
        return 0
    files = _image_files(Path(args.images))
    if description.get("kind") != "image":
        raise DataError(f"{model_path}: its encoder takes {description.get('kind')} inputs; predict classifies images")
    size = int(description["image_size"])
    for start in range(0, len(files), BATCH):
        names = files[start : start + BATCH]
        batch = np.stack([read_image(f, size) for f in names])
        for f, label in zip(names, model.predict(batch), strict=True):
            print(f"{f}\t{label}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Every `fedtransfer` subcommand: this is the only command-line entry point of the project."""
    from fedtransfer.cli.audit import add_audit_parser
    from fedtransfer.cli.deploy import add_deploy_parser
    from fedtransfer.cli.export import add_export_parser

    parser = argparse.ArgumentParser(prog="fedtransfer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
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
    sim.set_defaults(func=_simulate)
    pred = sub.add_parser("predict", help="classify an image or a folder of images with an exported model")
    pred.add_argument("model", help="model.pt written by a run")
    pred.add_argument(
        "images",
        help="an image file or a folder (searched recursively); for a tabular model a CSV "
        "file of its columns (prints row number and class)",
    )
    pred.add_argument(
        "--column",
        help="text model: the column (or JSONL key) of a .csv/.tsv/.jsonl file holding the "
        "texts; a plain file is one text per line (prints line number and class)",
    )
    pred.set_defaults(func=_predict)
    add_audit_parser(sub)
    add_export_parser(sub)  # model.onnx / model.torchscript.pt for serving
    add_deploy_parser(sub)  # init, superlink, register, site, run
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `fedtransfer` command; returns its exit status (2: a user error, said in one line)."""
    args = build_parser().parse_args(argv)
    from fedtransfer.common.encoders.interface import EncoderError
    from fedtransfer.common.errors import InputError
    from fedtransfer.common.storage.locking import FolderInUse
    from fedtransfer.deploy.credentials import CredentialsError
    from fedtransfer.deploy.launch import PortError
    from fedtransfer.deploy.supernode import ActivationError
    from fedtransfer.server.launch.launcher import LaunchError, RunFailed

    # InputError covers ConfigError, DataError, ModelFileError, ExportError, AuditLogError; a bare ValueError is a bug
    user_errors = (InputError, EncoderError, LaunchError, CredentialsError, PortError, ActivationError, FolderInUse)
    try:
        return args.func(args)
    except RunFailed as failed:  # it ran, and failed: not the user's input, and never a success
        print(f"fedtransfer: {failed}", file=sys.stderr)
        return 1
    except user_errors as err:
        print(f"fedtransfer: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedtransfer: interrupted; checkpoints written so far are intact (resume with --resume)", file=sys.stderr)
        return 130
