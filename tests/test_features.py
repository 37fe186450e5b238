"""Feature cache keys, the one bounded process cache, and the frozen site it serves."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from fedtransfer.client.site import Site, get_site
from fedtransfer.common.config.run import BackboneConfig, config_from_dict, config_from_run_config, to_run_config
from fedtransfer.common.data.sources import Samples
from fedtransfer.common.encoders.feature_cache import cache_key, cached_features
from fedtransfer.common.encoders.image import ImageBackbone, load_backbone
from fedtransfer.common.encoders.process_cache import ProcessCache, nbytes
from flwr.app import Context, RecordDict


@pytest.fixture(scope="module")
def backbone() -> ImageBackbone:
    return load_backbone(BackboneConfig(image_size=32))


def _samples(seed: int, n: int = 4) -> Samples:
    images = np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    return Samples(images, np.arange(n) % 2, ("a", "b"))


def test_cache_key_changes_with_preprocessing_weights_and_samples(backbone: ImageBackbone) -> None:
    samples = _samples(0)
    key = cache_key(backbone, samples)
    assert cache_key(backbone, _samples(0)) == key
    assert cache_key(backbone, _samples(1)) != key
    bigger = load_backbone(BackboneConfig(image_size=48))
    assert bigger.fingerprint != backbone.fingerprint
    assert cache_key(bigger, samples) != key


def test_features_are_read_back_from_disk_and_a_torn_file_is_recomputed(
    backbone: ImageBackbone, tmp_path: Path
) -> None:
    samples = _samples(2)
    first, computed = cached_features(backbone, samples, tmp_path)
    again, computed_again = cached_features(backbone, samples, tmp_path)
    assert computed and not computed_again
    assert torch.equal(first, again)
    (tmp_path / f"{cache_key(backbone, samples)}.pt").write_bytes(b"torn")
    fresh, recomputed = cached_features(backbone, samples, tmp_path)
    assert recomputed
    assert torch.equal(fresh, first)


def test_object_inputs_have_a_content_fingerprint() -> None:
    rows = np.array([["a", 1.5], ["b", None]], dtype=object)
    same = np.array([["a", 1.5], ["b", None]], dtype=object)
    other = np.array([["a", 1.5], ["b", 0.0]], dtype=object)
    labels = np.array([0, 1])
    assert Samples(rows, labels, ("x", "y")).fingerprint() == Samples(same, labels, ("x", "y")).fingerprint()
    assert Samples(rows, labels, ("x", "y")).fingerprint() != Samples(other, labels, ("x", "y")).fingerprint()


def test_process_cache_evicts_least_recently_used_by_entries() -> None:
    cache = ProcessCache(max_entries=2, max_bytes=1 << 20)
    built: list[str] = []

    def make(name: str) -> str:
        built.append(name)
        return name

    for key in ("a", "b", "a", "c", "a", "b"):
        cache.get(key, lambda key=key: make(key))
    assert built == ["a", "b", "c", "b"]  # "a" was used before "c" came, so "b" went first
    assert len(cache) == 2
    assert "a" in cache and "b" in cache


def test_process_cache_bounds_bytes_but_keeps_the_newest_entry() -> None:
    cache = ProcessCache(max_entries=100, max_bytes=1000)
    cache.get("small", lambda: np.zeros(100, dtype=np.uint8))
    cache.get("medium", lambda: np.zeros(800, dtype=np.uint8))
    assert cache.bytes == 900
    cache.get("large", lambda: np.zeros(5000, dtype=np.uint8))
    assert len(cache) == 1 and "large" in cache  # larger than the bound alone: kept, everything older dropped
    assert cache.bytes == 5000
    cache.get("small", lambda: np.zeros(100, dtype=np.uint8))
    assert "large" not in cache and cache.bytes == 100


def test_a_failed_build_caches_nothing() -> None:
    cache = ProcessCache(max_entries=4, max_bytes=1 << 20)

    def fail() -> int:
        raise ValueError("no data yet")

    with pytest.raises(ValueError):
        cache.get("k", fail)
    assert "k" not in cache
    assert cache.get("k", lambda: 3) == 3


def test_nbytes_counts_arrays_and_tensors_inside_dataclasses() -> None:
    samples = Samples(np.zeros((10, 4, 4, 1), dtype=np.uint8), np.zeros(10, dtype=np.int64), ("a",))
    assert nbytes(samples) == 160 + 80 + 1
    assert nbytes({"t": torch.zeros(3, dtype=torch.float32), "x": object()}) == 12


def _context(tmp_path: Path, partition: int) -> Context:
    cfg = config_from_dict(
        {
            "output_dir": str(tmp_path / "run"),
            "cache_dir": str(tmp_path / "cache"),
            "device": "cpu",
            "backbone": {"image_size": 32},
            "data": {"source": "digits", "num_sites": 2, "max_samples": 200},
        }
    )
    return Context(
        run_id=1,
        node_id=partition,
        node_config={"partition-id": partition, "num-partitions": 2},
        state=RecordDict(),
        run_config=to_run_config(cfg),
    )


def test_sites_are_frozen_and_built_once_per_process_cache(tmp_path: Path) -> None:
    cache = ProcessCache(max_entries=16, max_bytes=1 << 30)
    first, second = _context(tmp_path, 0), _context(tmp_path, 1)
    cfg = config_from_run_config(first.run_config)
    site = get_site(first, cfg, cache)
    assert isinstance(site, Site) and site.simulated
    assert get_site(first, cfg, cache) is site
    other = get_site(second, cfg, cache)
    assert other.name != site.name
    assert other.backbone is site.backbone  # one encoder for every site this process plays
    assert len(cache) == 4  # one encoder, one split, two sites
    with pytest.raises(dataclasses.FrozenInstanceError):
        site.simulated = False  # type: ignore[misc]
    assert len(site.train_x) == len(site.train_y) == len(site.data.train)
