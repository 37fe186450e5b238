"""`fedtransfer predict MODEL INPUT`: classify images, table rows or texts with an exported model.

Every readable image of a folder is classified; each unreadable one is named on stderr and the exit
status is 1. A table prints each row's file line (the header is line 1), a text file its line number.

`--format csv|json` (or `--scores`, which is csv) prints each class's probability beside the class, and
`--out FILE` writes them there instead (atomically: a reader never sees half a file). A binary model's
class is decided by the threshold stored in it (common/model/threshold.py), which the JSON names.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from fedtransfer.common.data.files import folder_images

BATCH = 64  # inputs classified at once


def add_predict_parser(sub: Any) -> None:
    """Register `fedtransfer predict` on the top-level parser's subparsers."""
    pred = sub.add_parser("predict", help="classify images, table rows or texts with an exported model")
    pred.add_argument("model", help="model.pt written by a run")
    pred.add_argument(
        "images",
        help="an image file or a folder (searched recursively); for a tabular model a CSV "
        "file of its columns (prints each row's file line, the header being line 1, and its class); "
        "for a text model a text file, or a .csv/.tsv/.jsonl file with --column",
    )
    pred.add_argument(
        "--column",
        help="text model: the column (or JSONL key) of a .csv/.tsv/.jsonl file holding the "
        "texts; a plain file is one text per line (prints line number and class)",
    )
    pred.add_argument(
        "--format",
        choices=("text", "csv", "json"),
        default=None,
        help="text (default): input and class, tab-separated; csv or json: each class's probability too "
        "(json also names a binary model's decision threshold and why it was chosen)",
    )
    pred.add_argument("--scores", action="store_true", help="each class's probability as CSV (--format csv)")
    pred.add_argument("--out", help="write the predictions to this file (atomically) instead of stdout")
    pred.set_defaults(func=predict_command)


def _image_files(target: Path) -> list[Path]:
    from fedtransfer.common.data.sources import IMAGE_SUFFIXES, DataError

    if not target.exists():
        raise DataError(f"{target}: no such file or folder; give an image or a folder of images")
    files = folder_images(target) if target.is_dir() else [target]
    if not files:
        raise DataError(f"{target}: no images found (suffixes {sorted(IMAGE_SUFFIXES)})")
    return files


class _Unreadable:
    """How many images of a folder could not be read (each named on stderr as it is met), of how many."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0


def _image_batches(files: list[Path], size: int, *, one_file: bool, bad: _Unreadable) -> Iterator[tuple[list, Any]]:
    """(names, images) per batch of readable images; an unreadable one is a line on stderr naming it.

    One corrupt file among thousands used to stop the whole folder with nothing classified.
    A single image given by name is still a user error (exit 2) when it cannot be read.
    """
    from fedtransfer.common.data.files import read_image  # the training loader's decoding: 16-bit scaling, same resize
    from fedtransfer.common.data.sources import DataError

    for start in range(0, len(files), BATCH):
        names, images = [], []
        for f in files[start : start + BATCH]:
            try:
                images.append(read_image(f, size))
            except DataError as err:
                if one_file:
                    raise
                print(f"fedtransfer: error: {err}", file=sys.stderr, flush=True)
                bad.count += 1
            else:
                names.append(f)
        if images:
            yield names, np.stack(images)


def _batches(model: Any, args: argparse.Namespace, bad: _Unreadable) -> Iterator[tuple[list, Any]]:
    """(names, raw inputs) per batch, by the model's encoder: table rows, texts or images."""
    from fedtransfer.common.data.sources import DataError

    description = model.encoder.describe()
    kind = description.get("kind")
    if kind in ("tabular", "text"):
        if kind == "tabular":  # a CSV of the declared columns, coded by the schema inside the model
            from fedtransfer.common.data.tables import read_table_inputs

            names, inputs = read_table_inputs(Path(args.images), description)
        else:  # one text per line, or a CSV/JSONL column (--column)
            from fedtransfer.common.data.texts import read_text_inputs

            names, inputs = read_text_inputs(Path(args.images), args.column)
        for start in range(0, len(inputs), BATCH):
            yield list(names[start : start + BATCH]), inputs[start : start + BATCH]
        return
    files = _image_files(Path(args.images))
    if kind != "image":
        raise DataError(f"{args.model}: its encoder takes {kind} inputs; predict classifies images")
    one_file = Path(args.images).is_file()
    bad.total = len(files)
    yield from _image_batches(files, int(description["image_size"]), one_file=one_file, bad=bad)


def _output_format(args: argparse.Namespace) -> str:
    from fedtransfer.common.errors import InputError

    if args.scores and args.format not in (None, "csv"):
        raise InputError(f"--scores prints CSV; drop it or --format {args.format}")
    return "csv" if args.scores else (args.format or "text")


def predict_command(args: argparse.Namespace) -> int:
    """Classify `args.images` with `args.model`: images, table rows (CSV) or texts, by the model's encoder."""
    from fedtransfer.common.data.sources import DataError
    from fedtransfer.server.export.model_file import load_model

    fmt = _output_format(args)
    model_path = Path(args.model)
    if not model_path.is_file():
        raise DataError(f"{model_path}: no such model file; pass the model.pt a run wrote into its output_dir")
    model = load_model(model_path)
    bad = _Unreadable()
    if fmt == "text" and args.out is None:  # streamed: a long folder shows its classes as they come
        for names, inputs in _batches(model, args, bad):
            for name, label in zip(names, model.predict(inputs), strict=True):
                print(f"{name}\t{label}", flush=True)
    else:
        rows = [
            (str(name), [float(p) for p in probs], label)
            for names, inputs in _batches(model, args, bad)
            for name, probs, label in _scored(model, names, inputs)
        ]
        _emit(_render(fmt, model, model_path, rows), args.out)
    if bad.count:
        print(f"fedtransfer: {bad.count} of {bad.total} images could not be read (named above)", file=sys.stderr)
    return 1 if bad.count else 0


def _scored(model: Any, names: list, inputs: Any) -> Iterator[tuple[Any, np.ndarray, str]]:
    probs = model.probabilities(inputs)
    yield from zip(names, probs, model.decide(probs), strict=True)


def _render(fmt: str, model: Any, model_path: Path, rows: list[tuple[str, list[float], str]]) -> str:
    """The predictions as text, CSV (input, one column per class, predicted) or JSON (with the threshold)."""
    if fmt == "text":
        return "".join(f"{name}\t{label}\n" for name, _, label in rows)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["input", *(f"p_{c}" for c in model.classes), "predicted"])
        writer.writerows([name, *(f"{p:.6f}" for p in probs), label] for name, probs, label in rows)
        return buf.getvalue()
    threshold = model.threshold
    document = {
        "model": str(model_path),
        "classes": model.classes,
        "threshold": None if threshold is None else {"positive_class": model.classes[1], **threshold.as_dict()},
        "predictions": [
            {"input": name, "scores": dict(zip(model.classes, probs, strict=True)), "predicted": label}
            for name, probs, label in rows
        ],
    }
    return json.dumps(document, indent=2) + "\n"


def _emit(text: str, out: str | None) -> None:
    """To stdout, or to `out` atomically; a folder that cannot be written is one line (exit 2)."""
    if out is None:
        sys.stdout.write(text)
        return
    from fedtransfer.common.errors import InputError
    from fedtransfer.common.storage import atomic

    try:
        atomic.write_text(Path(out), text)
    except OSError as err:
        why = err.strerror or err
        raise InputError(f"{out}: cannot write the predictions ({why}); give a writable --out") from None
