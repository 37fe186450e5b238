"""`fedtransfer export`: model.onnx and model.torchscript.pt, checked against model.pt and known to the audit.

The run folder is the synthetic run of tests/synthetic_run.py (real audit logs, ε claims,
config.json naming MNIST) whose model.pt is then replaced by a real exported model: the
MobileNetV2 ImageNet weights at 32 px and a seeded head over MNIST's 10 classes, recorded
with a second model-exported record as a re-export would be. The hold-out images come at
64 px, so the resize inside the exported graph is exercised too.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from fedtransfer.cli.main import main
from fedtransfer.common.config.run import BackboneConfig
from fedtransfer.common.encoders.registry import load_encoder
from fedtransfer.common.model.head import make_head
from fedtransfer.common.storage.audit_log import AuditLog, update_digest
from fedtransfer.common.wire.protocol import Event
from fedtransfer.server.audit.run import audit_run
from fedtransfer.server.export import serving
from fedtransfer.server.export.model_file import AdaptedModel, export_model, load_model
from onnx import numpy_helper

from tests.synthetic_run import RUN_ID, RunSpec, write_run

SAMPLES = "48"  # hold-out images each export is checked on: enough to compare, quick on 2 cores


def _real_model_run(run_dir: Path) -> Path:
    """A synthetic run whose model.pt is a real adapted model, logged as the run's last export."""
    write_run(run_dir, RunSpec())
    torch.manual_seed(0)
    encoder = load_encoder(BackboneConfig(name="mobilenet_v2", image_size=32), "cpu")
    head = make_head(encoder.feature_dim, 10)
    export_model(run_dir / "model.pt", encoder, head, hidden=0, classes=[str(i) for i in range(10)])
    AuditLog(run_dir / "audit.jsonl").append(
        Event.MODEL_EXPORTED, run_id=RUN_ID, round=2, path="model.pt", head=update_digest(serving.head_arrays(head))
    )
    return run_dir


@pytest.fixture(scope="module")
def export_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The run folder after `fedtransfer export` in both formats (each checked against model.pt), and what each printed.

    One export per format for the whole module: every test reads it, or copies the folder to change it.
    """
    run_dir = _real_model_run(tmp_path_factory.mktemp("serving") / "run")
    printed = {}
    for fmt in ("onnx", "torchscript"):
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert main(["export", str(run_dir), "--format", fmt, "--samples", SAMPLES]) == 0
        printed[fmt] = out.getvalue()
    return run_dir, printed


@pytest.fixture
def exported(export_run: tuple[Path, dict[str, str]]) -> Path:
    return export_run[0]


def test_export_prints_its_check(export_run: tuple[Path, dict[str, str]]) -> None:
    for fmt, runner in (("onnx", "onnxruntime"), ("torchscript", "torch.jit.load")):
        out = export_run[1][fmt]
        assert f"{SAMPLES}/{SAMPLES} hold-out images get model.pt's class" in out, out
        assert f"checked with {runner}" in out and f"(tolerance {serving.TOLERANCE:g})" in out, out


@pytest.mark.parametrize("size", [(32, 32), (50, 41), (200, 120)])
def test_exported_files_classify_raw_images_like_model_pt(
    exported: Path, size: tuple[int, int], tmp_path: Path
) -> None:
    """Any image size, uint8 RGB NHWC: both files give model.pt's logits (preprocessing is inside them).

    Each file is run from a folder of its own: it needs nothing beside it (no external weights file).
    """
    for name in ("model.onnx", "model.torchscript.pt"):
        shutil.copy(exported / name, tmp_path / name)
    images = np.random.default_rng(sum(size)).integers(0, 256, (5, *size, 3), dtype=np.uint8)
    model = load_model(exported / "model.pt")
    with torch.inference_mode():
        reference = model(images).numpy()
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    from_onnx = session.run(["logits"], {"images": images})[0]
    from_script = torch.jit.load(str(tmp_path / "model.torchscript.pt"))(torch.from_numpy(images)).detach().numpy()
    for logits in (from_onnx, from_script):
        assert logits.shape == (5, 10)
        assert np.abs(logits - reference).max() <= serving.TOLERANCE
        assert (logits.argmax(1) == reference.argmax(1)).all()


def test_audit_passes_with_exported_files_and_records_them(exported: Path) -> None:
    report = audit_run(exported)
    assert report.failures == []
    assert {str(exported / "model.onnx"), str(exported / "model.torchscript.pt")} <= set(report.files)


def test_audit_fails_an_export_whose_head_was_changed(exported: Path, tmp_path: Path) -> None:
    run_dir = shutil.copytree(exported, tmp_path / "run")
    proto = onnx.load(str(run_dir / "model.onnx"))
    bias = next(t for t in proto.graph.initializer if t.name == "head.1.bias")
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 1.0, bias.name))
    onnx.save(proto, str(run_dir / "model.onnx"))
    reasons = [f.reason for f in audit_run(run_dir).failures if f.check == "completion"]
    assert any("SHA-256 is not the one recorded" in r for r in reasons), reasons
    assert any("the head inside it" in r for r in reasons), reasons


def test_audit_fails_an_export_the_run_never_recorded(exported: Path, tmp_path: Path) -> None:
    """A model.torchscript.pt from another run (here: a run whose model was never exported for serving)."""
    run_dir = write_run(tmp_path / "other", RunSpec())
    shutil.copy(exported / "model.torchscript.pt", run_dir)
    reasons = [f.reason for f in audit_run(run_dir).failures if f.check == "completion"]
    assert any("no serving-exported record names it" in r for r in reasons), reasons


def test_an_export_that_disagrees_is_kept_aside_not_served(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = shutil.copytree(exported, tmp_path / "run")
    (run_dir / "model.torchscript.pt").unlink()
    lines = (run_dir / "audit.jsonl").read_text().count("\n")
    monkeypatch.setattr(serving, "TOLERANCE", -1.0)  # no file can be that close: the check must refuse it
    assert main(["export", str(run_dir), "--format", "torchscript", "--samples", "8"]) == 1
    assert "export NOT accepted" in capsys.readouterr().err
    assert not (run_dir / "model.torchscript.pt").exists() and (run_dir / "model.torchscript.pt.rejected").is_file()
    assert (run_dir / "audit.jsonl").read_text().count("\n") == lines  # nothing recorded


def test_export_of_a_failed_run_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = write_run(tmp_path / "run", RunSpec(status={"status": "failed", "reason": "too few sites"}))
    assert main(["export", str(run_dir), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "status.json: the run did not complete" in err


def test_a_text_model_is_refused_naming_its_tokenizer(tmp_path: Path) -> None:
    class TextStandIn:
        """Only what serving_graph reads of an encoder: its describe()."""

        def describe(self) -> dict[str, str]:
            return {"kind": "text", "name": "all-MiniLM-L6-v2"}

    model = AdaptedModel.__new__(AdaptedModel)  # no weights needed: the refusal comes before any tracing
    torch.nn.Module.__init__(model)
    model.encoder = TextStandIn()  # type: ignore[assignment]
    with pytest.raises(serving.ExportError, match="text model cannot be exported: its tokenizer"):
        serving.serving_graph(model, tmp_path / "model.pt")
