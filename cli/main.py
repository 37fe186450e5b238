"""The `fedtransfer` command: simulate, predict, export, audit, deploy.

User errors (fedtransfer.common.errors.InputError, and the deployment's refusals) end with one line
on stderr and exit status 2, no traceback. Anything else is a bug: its traceback, exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

BATCH = 64  # images classified at once by `predict`
PRIVATE_COMMANDS = ("simulate", "deploy")  # what they and their children write is the owner's alone


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


def _is_tool_litter(name: str) -> bool:
    """What tools leave beside images: hidden files and folders (.ipynb_checkpoints/, macOS's ._name.jpg
    twins, .thumbnails/) and an archive tool's __MACOSX/. Never an image the user meant."""
    return name.startswith(".") or name == "__MACOSX"


def _folder_images(root: Path) -> list[Path]:
    """Image files under `root`, through symlinked folders as a user who linked them means (each real
    folder once: a link back up is no loop); a broken link with an image suffix is kept, to be named."""
    from fedtransfer.common.data.sources import IMAGE_SUFFIXES

    files, seen = [], set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = sorted(d for d in subfolders if not _is_tool_litter(d))
        keep = (n for n in names if Path(n).suffix.lower() in IMAGE_SUFFIXES and not _is_tool_litter(n))
        files += [Path(folder) / n for n in keep]
    return sorted(files)


def _image_files(target: Path) -> list[Path]:
    from fedtransfer.common.data.sources import IMAGE_SUFFIXES, DataError

    if not target.exists():
        raise DataError(f"{target}: no such file or folder; give an image or a folder of images")
    files = _folder_images(target) if target.is_dir() else [target]
    if not files:
        raise DataError(f"{target}: no images found (suffixes {sorted(IMAGE_SUFFIXES)})")
    return files


def _predict_images(model: Any, files: list[Path], size: int, *, one_file: bool) -> int:
    """Print each readable image's class; each unreadable one is a line on stderr naming it, and exit 1.

    One corrupt file among thousands used to stop the whole folder with nothing classified.
    A single image given by name is still a user error (exit 2) when it cannot be read.
    """
    from fedtransfer.common.data.files import read_image  # the training loader's decoding: 16-bit scaling, same resize
    from fedtransfer.common.data.sources import DataError

    failed = 0
    for start in range(0, len(files), BATCH):
        names, images = [], []
        for f in files[start : start + BATCH]:
            try:
                images.append(read_image(f, size))
            except DataError as err:
                if one_file:
                    raise
                print(f"fedtransfer: error: {err}", file=sys.stderr, flush=True)
                failed += 1
            else:
                names.append(f)
        if images:
            for f, label in zip(names, model.predict(np.stack(images)), strict=True):
                print(f"{f}\t{label}", flush=True)
    if failed:
        print(f"fedtransfer: {failed} of {len(files)} images could not be read (named above)", file=sys.stderr)
    return 1 if failed else 0


def _predict(args: argparse.Namespace) -> int:
    from fedtransfer.common.data.sources import DataError
    from fedtransfer.server.export.model_file import load_model

    model_path = Path(args.model)
    if not model_path.is_file():
        raise DataError(f"{model_path}: no such model file; pass the model.pt a run wrote into its output_dir")
    model = load_model(model_path)
    description = model.encoder.describe()
    if description.get("kind") == "tabular":  # a CSV of the declared columns, coded by the schema inside the model
        from fedtransfer.common.data.tables import read_table_inputs

        lines, rows = read_table_inputs(Path(args.images), description)
        for start in range(0, len(rows), BATCH):
            labels = model.predict(rows[start : start + BATCH])
            for line, label in zip(lines[start : start + BATCH], labels, strict=True):
                print(f"{line}\t{label}")
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
    return _predict_images(model, files, int(description["image_size"]), one_file=Path(args.images).is_file())


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
        "file of its columns (prints each row's file line, the header being line 1, and its class)",
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
    from fedtransfer.server.federation.console import plain_when_redirected

    plain_when_redirected()  # Flower's coloured "WARNING :" only on a terminal, never in a redirected log
    from fedtransfer.common.encoders.interface import EncoderError
    from fedtransfer.common.errors import InputError
    from fedtransfer.common.storage.locking import FolderInUse
    from fedtransfer.common.storage.private import restrict_umask
    from fedtransfer.deploy.credentials import CredentialsError
    from fedtransfer.deploy.launch import PortError
    from fedtransfer.deploy.supernode import ActivationError
    from fedtransfer.server.launch.launcher import LaunchError, RunFailed

    # InputError covers ConfigError, DataError, ModelFileError, ExportError, AuditLogError; a bare ValueError is a bug
    user_errors = (InputError, EncoderError, LaunchError, CredentialsError, PortError, ActivationError, FolderInUse)
    # runs and deployments write ledgers, audit logs, databases: owner-only, also in every process they start
    previous_umask = restrict_umask() if args.command in PRIVATE_COMMANDS else None
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
    finally:
        if previous_umask is not None:  # a caller in this process (a test, a notebook) keeps its own
            os.umask(previous_umask)
