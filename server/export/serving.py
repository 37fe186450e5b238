"""`fedtransfer export RUN_DIR --format onnx|torchscript`: the run's model.pt as one graph for serving.

Serving stacks load ONNX (onnxruntime, Triton, ...) or TorchScript, not our model.pt. The
exported graph is the whole adapted model, preprocessing included: uint8 RGB images
(N, H, W, 3) of any size in, class logits (N, classes) out; the resize to the backbone's
image size (bilinear, antialiased) and the ImageNet normalisation happen inside the graph.

Every export is checked before it replaces anything: the written file runs (onnxruntime for
ONNX, `torch.jit.load` for TorchScript) on the run's server hold-out images and must give
model.pt's class for each, and logits within `TOLERANCE`. The export is then recorded in
the run's audit log (`serving-exported`: the file's SHA-256 and the head's digest), and
`fedtransfer audit` checks that the file is the one recorded and holds the exported head.

Only image models export: a text model's tokenizer and a tabular model's schema coding of
CSV cells run in Python, outside any tensor graph, so those are refused in one line (a
fine-tuned text run too). A fine-tuned image run exports its frozen part below the cut and
its top (the trained blocks or LoRA adapters and the head); the file names the head's
tensors, so the audit reads back exactly the exchanged ones, not LoRA's frozen base weights.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fedtransfer.common.config.run import ConfigError, config_from_dict
from fedtransfer.common.encoders.interface import file_sha256
from fedtransfer.common.errors import InputError
from fedtransfer.common.storage import locking
from fedtransfer.common.storage.audit_log import AuditLog, update_digest
from fedtransfer.common.wire.exchange import PREFIX
from fedtransfer.common.wire.protocol import Event
from fedtransfer.server.export.model_file import AdaptedModel, load_model
from torch import nn
from torch.nn import functional as F

FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
HEAD_NAMES = "fedtransfer_head_tensors"  # file metadata: the head's tensor names, JSON (a fine-tuned top has more)
TOLERANCE = 1e-3  # largest |logit difference| from model.pt accepted (float32, other kernels: ~1e-5 is usual)

BATCH = 64
OPSET = 18  # the first ONNX opset whose Resize has antialias
NOT_TRACEABLE = {
    "text": "its tokenizer (sentence-transformers, Python code) is not part of any tensor graph",
    "tabular": "its schema coding of CSV cells and missing-value rules run in Python (common/data/tables.py, "
    "common/encoders/tabular.py), not in a tensor graph",
}


class ExportError(InputError):
    """The run cannot be exported as asked; the message names the file and what to do."""


class ImageServingGraph(nn.Module):
    """uint8 RGB images (N, H, W, 3) -> logits, with model.pt's preprocessing inside the graph.

    The resize always runs (at the backbone's size it is the identity), so the graph has no
    branch on the input's shape and H and W stay free in the exported file.
    """

    def __init__(self, model: AdaptedModel) -> None:
        super().__init__()
        encoder = model.encoder
        self.image_size = int(encoder.describe()["image_size"])
        self.register_buffer("mean", torch.tensor(encoder.describe()["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(encoder.describe()["std"]).view(1, 3, 1, 1))
        self.encoder = encoder.module  # type: ignore[attr-defined]  # image encoders only: checked by the caller
        self.head = model.head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() / 255.0
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        return self.head(self.encoder((x - self.mean) / self.std))


@dataclass(frozen=True)
class Check:
    """How the exported file compared with model.pt on the hold-out images."""

    samples: int
    same_class: int
    ties: int  # differing classes where model.pt's two best logits are within TOLERANCE (a tie at float32)
    max_abs_diff: float

    @property
    def passed(self) -> bool:
        return self.same_class + self.ties == self.samples and self.max_abs_diff <= TOLERANCE


def serving_graph(model: AdaptedModel, model_path: Path) -> ImageServingGraph:
    """The graph to export, or ExportError naming why this model's encoder cannot be one."""
    kind = model.encoder.describe().get("kind")
    if kind != "image":
        why = NOT_TRACEABLE.get(str(kind), "only image encoders are exported")
        raise ExportError(
            f"{model_path}: a {kind} model cannot be exported: {why}; serve model.pt with "
            "fedtransfer.server.export.model_file.load_model"
        )
    return ImageServingGraph(model).eval()


def write_graph(graph: ImageServingGraph, fmt: str, path: Path) -> None:
    """Write `graph` in `fmt` to `path`; N, H and W of the input stay dynamic.

    The file also names the head's tensors (`HEAD_NAMES`): a fine-tuned top holds frozen
    tensors too (LoRA's base weights, frozen statistics), which are not the exchanged head.
    """
    example = torch.zeros(2, graph.image_size, graph.image_size, 3, dtype=torch.uint8)
    names = json.dumps(sorted(head_arrays(graph.head)))
    with warnings.catch_warnings():  # torch 2.14 marks torch.jit deprecated and the exporter chats: not ours to fix
        warnings.simplefilter("ignore")
        if fmt == "torchscript":
            torch.jit.trace(graph, (example,), check_trace=False).save(str(path), _extra_files={HEAD_NAMES: names})
            return
        batch, height, width = (torch.export.Dim(n, min=1) for n in ("batch", "height", "width"))
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            dynamo=True,
            opset_version=OPSET,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes={"images": {0: batch, 1: height, 2: width}},
            external_data=False,
            verbose=False,
        )  # weights inside: one file to serve (all < 2 GB)
    import onnx

    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {HEAD_NAMES: names})
    onnx.save(proto, str(path))


def run_file(path: Path, fmt: str) -> Any:
    """A callable uint8 NHWC array -> logits array, running the exported file itself."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda images: session.run(["logits"], {"images": images})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(path), map_location="cpu").eval()

    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return loaded(torch.from_numpy(images)).numpy()

    return run


def compare(path: Path, fmt: str, model: AdaptedModel, images: np.ndarray) -> Check:
    """Run the exported file and model.pt on `images`; classes and logits side by side."""
    exported = run_file(path, fmt)
    same = ties = 0
    worst = 0.0
    for start in range(0, len(images), BATCH):
        batch = np.ascontiguousarray(images[start : start + BATCH])
        with torch.inference_mode():
            reference = model(batch).numpy()
        logits = np.asarray(exported(batch))
        worst = max(worst, float(np.abs(logits - reference).max()))
        top2 = np.sort(reference, axis=1)[:, -2:] if reference.shape[1] > 1 else np.zeros((len(batch), 2))
        agree = logits.argmax(1) == reference.argmax(1)
        same += int(agree.sum())
        ties += int((~agree & (top2[:, 1] - top2[:, 0] <= TOLERANCE)).sum())
    return Check(len(images), same, ties, worst)


def holdout_images(run_dir: Path, limit: int) -> np.ndarray:
    """The first `limit` server hold-out images of the run (config.json), as uint8 RGB (N, H, W, 3)."""
    from fedtransfer.common.data.federation import federation_for

    config_path = run_dir / "config.json"
    try:
        cfg = config_from_dict(json.loads(config_path.read_text(encoding="utf-8")))
    except (OSError, ValueError, ConfigError) as err:
        raise ExportError(
            f"{config_path}: cannot read the run's config ({str(err)[:120]}); the export is checked on "
            "the run's hold-out images, which it names"
        ) from None
    images = np.asarray(federation_for(cfg).server_test.inputs[:limit])
    if images.ndim == 3:
        images = images[..., None]
    return np.ascontiguousarray(np.broadcast_to(images, (*images.shape[:3], 3)), dtype=np.uint8)


def head_arrays(head: nn.Module) -> dict[str, np.ndarray]:
    """The head's tensors named as on the wire and in the audit log."""
    return {PREFIX + k: v.detach().cpu().numpy() for k, v in head.state_dict().items()}


def export_run(run_dir: Path, fmt: str, limit: int) -> tuple[Path, Check]:
    """Export RUN_DIR/model.pt as `fmt` beside it, checked against model.pt; (file, check).

    The file is written under a temporary name and takes its place only when the check
    passed, so a served model.onnx is never one that disagrees with model.pt.
    """
    model_path = run_dir / "model.pt"
    status = _completed_status(run_dir)
    locking.check_free(run_dir)  # a run still writing this folder: its model is not final
    model = load_model(model_path)
    graph = serving_graph(model, model_path)
    images = holdout_images(run_dir, limit)
    target = run_dir / FILES[fmt]
    fd, name = tempfile.mkstemp(dir=run_dir, prefix=f".{target.name}.", suffix=".partial")
    os.close(fd)
    tmp = Path(name)
    try:
        write_graph(graph, fmt, tmp)
        if update_digest(file_head(tmp, fmt)) != update_digest(head_arrays(model.head)):  # what the audit reads back
            raise ExportError(
                f"{model_path}: the {fmt} graph does not keep the head's tensors under their names "
                "(finetune.train); serve model.pt with fedtransfer.server.export.model_file.load_model"
            )
        check = compare(tmp, fmt, model, images)
        if not check.passed:
            return tmp.replace(run_dir / f"{target.name}.rejected"), check
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    AuditLog(run_dir / "audit.jsonl").append(
        Event.SERVING_EXPORTED,
        run_id=status.get("run_id"),
        format=fmt,
        path=target.name,
        sha256=file_sha256(target),
        head=update_digest(head_arrays(model.head)),
        checked={
            "samples": check.samples,
            "same_class": check.same_class,
            "ties": check.ties,
            "max_abs_logit_diff": check.max_abs_diff,
            "tolerance": TOLERANCE,
        },
    )
    return target, check


def _completed_status(run_dir: Path) -> dict[str, Any]:
    """status.json of a completed run, or ExportError saying there is no model to export."""
    if not (run_dir / "model.pt").is_file():
        raise ExportError(f"{run_dir}: no model.pt; give the output_dir of a completed run")
    try:
        status = json.loads((run_dir / "status.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        status = None
    if not isinstance(status, dict) or status.get("status") != "completed":
        raise ExportError(f"{run_dir / 'status.json'}: the run did not complete; export the model of a completed run")
    return status


def file_head(path: Path, fmt: str | None = None) -> dict[str, np.ndarray]:
    """The head tensors inside an exported file (wire names), read back for the audit.

    `fmt` ("onnx" or "torchscript") when the name does not say it (a file still being checked).

    ONNX initializers are read with `onnx` (no code runs); a TorchScript file is loaded with
    `torch.jit.load`, which runs no Python. Raises ValueError when the file holds no head.
    """
    if (fmt or ("onnx" if path.name == FILES["onnx"] else "torchscript")) == "onnx":
        import onnx
        from onnx import numpy_helper

        proto = onnx.load(str(path))
        named = next((p.value for p in proto.metadata_props if p.key == HEAD_NAMES), "")
        found = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer if t.name.startswith(PREFIX)}
    else:
        extra = {HEAD_NAMES: ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            state = torch.jit.load(str(path), map_location="cpu", _extra_files=extra).state_dict()
        named = extra[HEAD_NAMES]
        found = {k: v.numpy() for k, v in state.items() if k.startswith(PREFIX)}
    if named:  # a fine-tuned top: only the tensors the file names as its head (frozen ones stay out)
        found = {k: v for k, v in found.items() if k in set(json.loads(named))}
    if not found:
        raise ValueError("no head tensors inside")
    return found
