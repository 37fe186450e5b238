"""`fedtransfer export RUN_DIR --format onnx|torchscript`: its arguments, its summary and its exit status.

Kept apart from server/export/serving.py so that building the command line imports no torch.
Exit status: 0 written and checked, 1 the file disagrees with model.pt (kept as *.rejected),
2 the run cannot be exported (one line on stderr naming the file and what to do).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

FORMATS = ("onnx", "torchscript")
MAX_CHECKED = 512  # hold-out images the export is checked on (all of them when fewer)


def add_export_parser(subparsers: Any) -> None:
    """Register `fedtransfer export` on the top-level parser's subparsers."""
    p = subparsers.add_parser(
        "export",
        help="write model.onnx or model.torchscript.pt beside a run's model.pt, "
        "checked against it on the run's hold-out images",
    )
    p.add_argument("run_dir", type=Path, help="the output_dir of a completed run")
    p.add_argument("--format", required=True, choices=FORMATS, help="onnx (onnxruntime) or torchscript")
    p.add_argument(
        "--samples",
        type=int,
        default=MAX_CHECKED,
        help=f"hold-out images the export is checked on (default {MAX_CHECKED})",
    )
    p.set_defaults(func=export_command)


def export_command(args: argparse.Namespace) -> int:
    """0: written and checked; 1: the file disagrees with model.pt (kept as *.rejected); 2: cannot export."""
    from fedtransfer.server.export.serving import TOLERANCE, ExportError, export_run

    if args.samples < 1:
        raise ExportError("--samples: must be at least 1")
    path, check = export_run(args.run_dir, args.format, args.samples)  # a bad model.pt: ModelFileError, exit 2
    runner = "onnxruntime" if args.format == "onnx" else "torch.jit.load"
    verdict = (
        f"{check.same_class}/{check.samples} hold-out images get model.pt's class"
        + (f" ({check.ties} more differ only on a tie within {TOLERANCE:g})" if check.ties else "")
        + f"; max |logit difference| {check.max_abs_diff:.2e} (tolerance {TOLERANCE:g})"
    )
    if not check.passed:
        print(
            f"fedtransfer: export NOT accepted, checked with {runner}: {verdict}; the file is kept as {path}",
            file=sys.stderr,
        )
        return 1
    print(
        f"fedtransfer: wrote {path}: uint8 RGB images (N, H, W, 3) -> logits (N, classes), resize and "
        "normalisation inside"
    )
    print(f"fedtransfer: checked with {runner}: {verdict}")
    return 0
