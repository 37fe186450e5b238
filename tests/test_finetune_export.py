"""`fedtransfer export` of a fine-tuned image run: the graph carries the trained blocks or adapters, the audit passes.

The run folder is tests/synthetic_run.py's (real audit logs, config.json naming MNIST) with a
real fine-tuned model.pt: MobileNetV2 at 32 px cut below its last block, its top's trainable
tensors moved off the pretrained ones (a LoRA adapter's B starts at zero), and a
model-exported record naming that top, as a fine-tuned run writes it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fedtransfer.cli.main import main
from fedtransfer.common.config.finetune import FinetuneConfig
from fedtransfer.common.config.run import BackboneConfig
from fedtransfer.common.encoders.registry import load_encoder
from fedtransfer.common.model.finetune import cut_encoder, make_top
from fedtransfer.common.storage.audit_log import AuditLog, update_digest
from fedtransfer.common.wire.protocol import Event
from fedtransfer.server.audit.run import audit_run
from fedtransfer.server.export import serving
from fedtransfer.server.export.model_file import export_model

from tests.synthetic_run import RUN_ID, RunSpec, write_run


def _fine_tuned_run(run_dir: Path, ft: FinetuneConfig) -> Path:
    write_run(run_dir, RunSpec())
    torch.manual_seed(0)
    cut = cut_encoder(load_encoder(BackboneConfig(name="mobilenet_v2", image_size=32), "cpu"), ft)
    top = make_top(cut, 10, hidden=0, centred=False, ft=ft)
    with torch.no_grad():
        for p in top.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    export_model(run_dir / "model.pt", cut, top, hidden=0, classes=[str(i) for i in range(10)], finetune=ft)
    AuditLog(run_dir / "audit.jsonl").append(
        Event.MODEL_EXPORTED, run_id=RUN_ID, round=2, path="model.pt", head=update_digest(serving.head_arrays(top))
    )
    return run_dir


@pytest.mark.parametrize(
    "ft", [FinetuneConfig(train="lora", lora_rank=2), FinetuneConfig(train="blocks")], ids=["lora", "blocks"]
)
def test_fine_tuned_image_run_exports_and_passes_its_audit(
    ft: FinetuneConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _fine_tuned_run(tmp_path / "run", ft)
    for fmt in ("onnx", "torchscript"):
        assert main(["export", str(run_dir), "--format", fmt, "--samples", "24"]) == 0
        assert "24/24 hold-out images get model.pt's class" in capsys.readouterr().out
        inside = serving.file_head(run_dir / serving.FILES[fmt])
        # the exchanged tensors exactly: the adapters or the block's weights and the head, no frozen tensor
        assert any(k.startswith("head.blocks.") for k in inside) and any(k.startswith("head.head.") for k in inside)
        assert not any("base_layer" in k or "running_" in k for k in inside)
    report = audit_run(run_dir)
    assert report.failures == []
    assert {str(run_dir / name) for name in serving.FILES.values()} <= set(report.files)
