"""`fedtransfer predict MODEL INPUT`: classify images, table rows or texts with an exported model.

Every readable image of a folder is classified; each unreadable one is named on stderr and the exit
status is 1. A table prints each row's file line (the header is line 1), a text file its line number.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
from fedtransfer.common.data.files import folder_images

BATCH = 64  # inputs classified at once


def add_predict_parser(sub: Any) -> None:
    """Register `fedtransfer predict` on the top-level parser's subparsers."""
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
    pred.set_defaults(func=predict_command)


def _image_files(target: Path) -> list[Path]:
    from fedtransfer.common.data.sources import IMAGE_SUFFIXES, DataError

    if not target.exists():
        raise DataError(f"{target}: no such file or folder; give an image or a folder of images")
    files = folder_images(target) if target.is_dir() else [target]
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


def predict_command(args: argparse.Namespace) -> int:
    """Classify `args.images` with `args.model`: images, table rows (CSV) or texts, by the model's encoder."""
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
