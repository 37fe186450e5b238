"""Fine-tuning beyond the head, end to end on Flower's Simulation Engine (real Ray, real SuperLink), small."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from fedtransfer.cli.main import main
from fedtransfer.common.storage.audit_log import read_records
from fedtransfer.server.export.model_file import load_model

ROOT = Path(__file__).resolve().parent.parent


def test_lora_run_sends_only_its_trainable_tensors_and_passes_its_audit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """LoRA on MobileNetV2's last block under DP, Dirichlet sites, personal models: the run-started record names the
    trainable tensors, every update sent is exactly them, each site reports its global and personal accuracy every
    round, the audit passes, model.pt carries the adapters."""
    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text(encoding="utf-8"))
    run_dir = tmp_path / "run"
    raw |= {"output_dir": str(run_dir), "cache_dir": str(tmp_path / "cache"), "device": "cpu"}
    raw["backbone"]["image_size"] = 32
    raw["data"] |= {"num_sites": 2, "max_samples": 600, "alpha": 0.3}
    raw["train"] |= {"rounds": 2, "local_epochs": 1, "batch_size": 32, "protocol": "fedavg", "learning_rate": 0.5}
    raw["privacy"] |= {"target_delta": 1.0e-4, "feature_stats": False, "accountant": "rdp"}
    raw["finetune"] |= {"train": "lora", "blocks": 1, "lora_rank": 2}
    raw["personal"] |= {"enabled": True, "epochs": 1, "dp": True}
    config = tmp_path / "finetune.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["simulate", "--config", str(config), "--quiet"]) == 0

    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "completed"
    [started] = [r for r in read_records(run_dir / "audit.jsonl") if r["event"] == "run-started"]
    names = started["head"]
    assert started["trains"] == {"train": "lora", "blocks": 1, "lora_rank": 2, "lora_alpha": 8.0}
    assert any(".lora_A." in n for n in names) and any(n.startswith("head.head.") for n in names)
    assert not any("base_layer" in n or "running_" in n for n in names)  # frozen tensors never leave
    for name in ("site-0", "site-1"):
        sent = [
            r
            for r in read_records(run_dir / "sites" / name / "audit.jsonl")
            if r["event"] == "update-sent" and r["round"] > 0
        ]
        assert len(sent) == 2 and all(sorted(t["name"] for t in r["update"]["tensors"]) == names for r in sent)
        personal = [
            r for r in read_records(run_dir / "sites" / name / "audit.jsonl") if r["event"] == "personal-trained"
        ]
        assert [r["round"] for r in personal] == [1, 2] and all(r["dp_chosen"] and r["dp"] for r in personal)
    # every round, the federated metrics come from the sites' noisy statistics; no personal score leaves a site
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in rounds] == [0, 1, 2]  # round 0: the DP record counts, no model to score
    for line in rounds[1:]:
        assert line["federated"]["sites"] == 2 and 0 <= line["federated"]["accuracy"] <= 1
        assert not {"per_site", "personal_accuracy"} & set(line["federated"])
    assert "final_sites" not in status
    capsys.readouterr()
    assert main(["audit", str(run_dir)]) == 0, capsys.readouterr()

    model = load_model(run_dir / "model.pt")
    assert sorted(f"head.{k}" for k in model.head.state_dict()) == names
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    assert len(model.predict(images)) == 3
