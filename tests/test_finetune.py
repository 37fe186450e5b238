"""Fine-tuning beyond the head: the cut, the trainable top, what it exchanges, Opacus, the activation cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from fedtransfer.common.config.catalog import CATALOG
from fedtransfer.common.config.finetune import FinetuneConfig
from fedtransfer.common.config.run import ConfigError, config_from_dict
from fedtransfer.common.data.sources import Samples
from fedtransfer.common.encoders.cut_cache import SUFFIX, cached_activations, evict
from fedtransfer.common.encoders.feature_cache import cached_features
from fedtransfer.common.encoders.image import ImageBackbone, feature_network
from fedtransfer.common.encoders.interface import EncoderError
from fedtransfer.common.encoders.stages import blocks, flat_modules, fold_batchnorm, split
from fedtransfer.common.model.finetune import CutEncoder, Top, cut_encoder, make_top, parameter_groups
from fedtransfer.common.privacy.calibration import plan_dp
from fedtransfer.common.privacy.dp_sgd import LocalTraining, train_head
from fedtransfer.common.wire.exchange import head_spec, head_to_arrays, load_head
from torch import nn

IMAGE = [name for name, spec in CATALOG.items() if spec.kind == "image"]


def _encoder(name: str = "mobilenet_v2", size: int = 32) -> ImageBackbone:
    torch.manual_seed(0)
    net = feature_network(name)
    for m in net.modules():  # real statistics (of random images), so frozen BatchNorm is checked against them
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        net.train()(torch.randn(32, 3, size, size))
    return ImageBackbone(name, net.eval(), size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "cpu")


def _images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", IMAGE)
def test_catalog_block_count_is_the_networks(name: str) -> None:
    kwargs = {"aux_logits": False, "init_weights": False} if name == "inception_v3" else {}
    with torch.device("meta"):
        net = torchvision.models.get_model(name, **kwargs)
    assert len(blocks(flat_modules(name, net))) - 1 == CATALOG[name].blocks  # one block always stays below


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18"])
def test_below_then_above_is_the_feature_network(name: str) -> None:
    encoder = _encoder(name)
    x = encoder.preprocess(torch.from_numpy(_images(3)).permute(0, 3, 1, 2).float() / 255)
    below, above = split(name, encoder.module.net, 2)
    with torch.no_grad():
        torch.testing.assert_close(above(below(x)), encoder.module(x))


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18"])
def test_batchnorm_folded_below_the_cut_computes_the_same_and_leaves_the_encoder(name: str) -> None:
    encoder = _encoder(name)
    weights = {k: v.clone() for k, v in encoder.state_dict().items()}
    x = encoder.preprocess(torch.from_numpy(_images(3)).permute(0, 3, 1, 2).float() / 255)
    below, _ = split(name, encoder.module.net, 1)
    folded = fold_batchnorm(below.eval())
    count = {m: sum(isinstance(n, nn.BatchNorm2d) for n in m.modules()) for m in (below, folded)}
    assert count[folded] < count[below] and (name != "mobilenet_v2" or count[folded] == 0)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), below(x), rtol=1e-4, atol=1e-4)
    assert sum(isinstance(n, nn.BatchNorm2d) for n in below.modules()) == count[below]  # the encoder's own modules
    assert encoder.state_dict().keys() == weights.keys()
    assert all(torch.equal(v, weights[k]) for k, v in encoder.state_dict().items())


def test_top_on_cut_activations_is_the_head_on_features() -> None:
    """Frozen BatchNorm and the copy of the blocks compute what the encoder computes (float16 cache aside)."""
    base = _encoder()
    cut = cut_encoder(base, FinetuneConfig(train="blocks", blocks=2))
    assert isinstance(cut, CutEncoder) and cut.fingerprint == base.fingerprint
    assert cut.describe()["cut"] == {"blocks": 2}
    top = make_top(cut, 10, hidden=0, centred=False, ft=FinetuneConfig(train="blocks", blocks=2))
    head = make_top(base, 10, hidden=0, centred=False, ft=FinetuneConfig())
    head.load_state_dict(top.head.state_dict())
    images = _images(5)
    with torch.no_grad():
        torch.testing.assert_close(top(cut.embed(images)), head(base.embed(images)), rtol=1e-4, atol=1e-4)
        half = top(cut.embed(images).half())
    torch.testing.assert_close(half, head(base.embed(images)), rtol=0.02, atol=0.02)


def test_batch_statistics_are_never_used_in_training_mode() -> None:
    cut = cut_encoder(_encoder(), FinetuneConfig(train="blocks", blocks=3))
    top = make_top(cut, 10, hidden=0, centred=False, ft=FinetuneConfig(train="blocks", blocks=3)).train()
    x = cut.embed(_images(6))
    with torch.no_grad():
        torch.testing.assert_close(top(x[:1]), top(x)[:1])  # one sample's output does not depend on the batch
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in top.modules())


def test_exchanged_tensors_are_exactly_the_trainable_ones() -> None:
    cut = cut_encoder(_encoder(), FinetuneConfig(train="blocks", blocks=1))
    for ft in (FinetuneConfig(train="blocks"), FinetuneConfig(train="lora", lora_rank=2)):
        top = make_top(cut, 10, hidden=0, centred=False, ft=ft)
        trainable = {n for n, p in top.named_parameters() if p.requires_grad}
        head_state = {f"head.{k}" for k in top.head.state_dict()}
        assert set(top.state_dict()) == trainable | head_state
        assert not any("running_" in n for n in top.state_dict())  # frozen statistics stay home
        if ft.train == "lora":
            assert {n for n in trainable if n.startswith("blocks.")} and all(
                ".lora_A." in n or ".lora_B." in n for n in trainable if n.startswith("blocks.")
            )
            assert not any("base_layer" in n for n in top.state_dict())
        other = make_top(cut, 10, hidden=0, centred=False, ft=ft)
        load_head(other, head_to_arrays(top))  # the exchange's own check and load
        assert head_spec(other) == head_spec(top)
        for k, v in top.state_dict().items():
            torch.testing.assert_close(other.state_dict()[k], v)
        with pytest.raises(RuntimeError, match="not this top's tensors"):
            other.load_state_dict({**top.state_dict(), "blocks.extra": torch.zeros(1)})


@pytest.mark.parametrize(
    "ft",
    [
        FinetuneConfig(train="blocks"),
        FinetuneConfig(train="lora", lora_rank=2),
        FinetuneConfig(train="blocks", norm="groupnorm"),
    ],
)
def test_opacus_trains_the_top_as_it_is(ft: FinetuneConfig) -> None:
    cut = cut_encoder(_encoder(), ft)
    top = make_top(cut, 10, hidden=0, centred=False, ft=ft)
    frozen = {k: v.clone() for k, v in nn.Module.state_dict(top).items() if k not in top.exchanged}
    before = {k: v.clone() for k, v in top.state_dict().items()}
    x, y = cut.embed(_images(64)), torch.arange(64) % 10
    plan = plan_dp(
        num_samples=64,
        batch_size=16,
        local_epochs=1,
        rounds=1,
        target_epsilon=8.0,
        target_delta=1e-5,
        max_grad_norm=1.0,
        accountant="rdp",
    )
    outcome = train_head(top, x.half(), y, LocalTraining(1, 16, 0.1), plan, [], seed=1)
    assert outcome.steps == 4 and outcome.history
    after = nn.Module.state_dict(top)
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # statistics and LoRA's base weights untouched
    assert any(not torch.equal(top.state_dict()[k], v) for k, v in before.items() if k.startswith("blocks."))


def test_backbone_tensors_get_their_own_learning_rate() -> None:
    ft = FinetuneConfig(train="blocks", backbone_lr_scale=0.1)
    top = make_top(cut_encoder(_encoder(), ft), 10, hidden=0, centred=False, ft=ft)
    groups = parameter_groups(top, 0.5)
    assert [g["lr"] for g in groups] == [0.5, pytest.approx(0.05)]
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in top.parameters() if p.requires_grad)


def test_head_only_is_todays_head() -> None:
    base = _encoder()
    assert cut_encoder(base, FinetuneConfig()) is base
    assert not isinstance(make_top(base, 10, hidden=0, centred=False, ft=FinetuneConfig()), Top)


def test_activations_are_cached_memory_mapped_and_keyed(tmp_path) -> None:
    cut = cut_encoder(_encoder(), FinetuneConfig(train="blocks", blocks=1))
    samples = Samples(_images(20), np.arange(20) % 10, [str(i) for i in range(10)])
    first, computed = cached_features(cut, samples, tmp_path)
    second, again = cached_features(cut, samples, tmp_path)
    assert computed and not again and first.dtype == torch.float16 and first.shape == (20, cut.feature_dim)
    assert _mapped_from(second, next(tmp_path.glob(f"*{SUFFIX}")))  # memory-mapped, not read into memory
    assert first.float().std(0).mean() > 1e-3  # samples differ: the check below means something
    torch.testing.assert_close(second.float(), cut.embed(samples.inputs), rtol=1e-2, atol=1e-2)
    [path] = tmp_path.glob(f"*{SUFFIX}")
    torn = path.with_suffix(".torn")  # a new file in its place: the live mappings keep the old one
    torn.write_bytes(path.read_bytes()[:100])
    torn.replace(path)  # torn: recomputed, never trusted
    third, recomputed = cached_features(cut, samples, tmp_path)
    assert recomputed and torch.equal(third, first)
    deeper = cut_encoder(_encoder(), FinetuneConfig(train="blocks", blocks=2))
    cached_features(deeper, samples, tmp_path)
    assert len(list(tmp_path.glob(f"*{SUFFIX}"))) == 2  # another cut is another key


def _mapped_from(tensor: torch.Tensor, path) -> bool:
    """Whether the tensor's memory lies in a mapping of `path` (Linux: /proc/self/maps)."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path.resolve()):
            low, high = (int(a, 16) for a in fields[0].split("-"))
            if low <= address < high:
                return True
    return False


def test_cache_keeps_the_most_recently_used_within_its_bound(tmp_path) -> None:
    def ones(start: int, stop: int) -> torch.Tensor:
        return torch.ones(stop - start, 100)

    paths = [tmp_path / f"{i}{SUFFIX}" for i in range(3)]
    for p in paths:  # each file is 10 x 100 float16 values plus the .npy header
        cached_activations(p, count=10, dim=100, compute=ones, max_bytes=1 << 20)
    size = paths[0].stat().st_size
    cached_activations(paths[0], count=10, dim=100, compute=ones, max_bytes=1 << 20)  # read: now the most recently used
    assert evict(tmp_path, 2 * size) == [paths[1]]
    with pytest.raises(EncoderError, match=r"finetune\.cache_max_gb"):
        cached_activations(tmp_path / f"big{SUFFIX}", count=10, dim=100, compute=ones, max_bytes=size // 2)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"finetune": {"train": "lora"}, "train": {"protocol": "fedsgd"}}, "train.protocol"),
        (
            {"finetune": {"train": "blocks"}, "privacy": {"feature_stats": True}, "train": {"protocol": "fedavg"}},
            "privacy.feature_stats",
        ),
        ({"finetune": {"train": "blocks", "blocks": 19}}, "finetune.blocks"),
        ({"finetune": {"train": "lora", "norm": "groupnorm"}}, "finetune.norm"),
        (
            {
                "finetune": {"train": "blocks"},
                "backbone": {"name": "tabular", "schema": "s.yaml"},
                "data": {"source": "table", "path": "x.csv"},
            },
            "finetune.train",
        ),
        ({"personal": {"enabled": True, "dp": True}, "train": {"fraction_evaluate": 0.0}}, "train.fraction_evaluate"),
        ({"personal": {"enabled": True, "dp": True}, "train": {"evaluate_every": 5}}, "train.evaluate_every"),
    ],
)
def test_config_refuses_what_cannot_work(raw: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict(raw)
