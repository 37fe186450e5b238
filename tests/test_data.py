"""Data sources and splits: every sample used once, deterministic, and readable errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.data import (
    DataError,
    Samples,
    load_image_folder,
    load_npz,
    load_source,
    partition_dirichlet,
    partition_iid,
    simulate_federation,
    site_split,
)

LABELS = np.repeat(np.arange(10), 60)  # 600 samples, 10 balanced classes


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    together = np.concatenate(parts)
    assert len(together) == n, "a sample is missing or used twice"
    assert np.array_equal(np.sort(together), np.arange(n))


def _max_class_share(parts: list[np.ndarray], labels: np.ndarray) -> float:
    return float(np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]))


def _id_images(n: int, size: int = 8) -> np.ndarray:
    """Grayscale images whose first two pixels spell the sample's id (0..65535)."""
    images = np.random.default_rng(n).integers(0, 256, size=(n, size, size, 1), dtype=np.uint8)
    ids = np.arange(n)
    images[:, 0, 0, 0] = ids // 256
    images[:, 0, 1, 0] = ids % 256
    return images


def _ids(samples: Samples) -> np.ndarray:
    return samples.images[:, 0, 0, 0].astype(np.int64) * 256 + samples.images[:, 0, 1, 0]


def _write_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """MedMNIST layout: train/val/test splits, labels of shape (N, 1)."""
    a, b = len(images) // 2, 3 * len(images) // 4
    np.savez(
        path,
        train_images=images[:a],
        train_labels=labels[:a, None],
        val_images=images[a:b],
        val_labels=labels[a:b, None],
        test_images=images[b:],
        test_labels=labels[b:, None],
    )


def _write_png(path: Path, value: int, size: tuple[int, int] = (12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)


@pytest.mark.parametrize("split", ["iid", "dirichlet"])
def test_partitions_use_every_sample_once(split: str) -> None:
    parts = partition_iid(LABELS, 7, seed=3) if split == "iid" else partition_dirichlet(LABELS, 7, 0.5, seed=3)
    assert len(parts) == 7
    _assert_exact_cover(parts, len(LABELS))


@pytest.mark.parametrize("split", ["iid", "dirichlet"])
def test_partitions_are_deterministic_per_seed(split: str) -> None:
    def run(seed: int) -> list[np.ndarray]:
        return partition_iid(LABELS, 4, seed) if split == "iid" else partition_dirichlet(LABELS, 4, 0.5, seed)

    same = zip(run(1), run(1), strict=True)
    assert all(np.array_equal(a, b) for a, b in same)
    other = zip(run(1), run(2), strict=True)
    assert not all(np.array_equal(a, b) for a, b in other)


def test_dirichlet_skews_labels_and_leaves_no_site_empty() -> None:
    for seed in range(3):
        iid = partition_iid(LABELS, 10, seed)
        skewed = partition_dirichlet(LABELS, 10, alpha=0.1, seed=seed)
        assert all(len(p) >= 2 for p in skewed)
        assert _max_class_share(iid, LABELS) < 0.25
        assert _max_class_share(skewed, LABELS) > 0.45


def test_dirichlet_that_cannot_fill_sites_names_the_fix() -> None:
    with pytest.raises(DataError, match=r"raise data\.alpha or lower data\.num_sites"):
        partition_dirichlet(np.zeros(5, dtype=np.int64), 4, alpha=0.01, seed=0)


@pytest.mark.parametrize("split", ["iid", "dirichlet"])
def test_server_holdout_is_disjoint_from_every_site(tmp_path: Path, split: str) -> None:
    n = 400
    path = tmp_path / "pool.npz"
    _write_npz(path, _id_images(n), np.arange(n) % 4)
    fed = simulate_federation("npz", str(path), split, 3, 0.5, 0.25, 0.1, 32, seed=5)
    server = set(_ids(fed.server_test).tolist())
    assert len(server) == 40
    seen = [server]
    for site in fed.sites:
        assert len(site.train) > 0
        assert len(site.test) > 0
        seen += [set(_ids(site.train).tolist()), set(_ids(site.test).tolist())]
        assert np.array_equal(site.train.labels, _ids(site.train) % 4), "labels travel with their images"
    assert sum(len(s) for s in seen) == n, "no sample is in two places"
    assert set().union(*seen) == set(range(n))
    assert [s.name for s in fed.sites] == ["site-0", "site-1", "site-2"]


def test_simulated_federation_is_deterministic(tmp_path: Path) -> None:
    path = tmp_path / "pool.npz"
    _write_npz(path, _id_images(200), np.arange(200) % 3)
    a, b = (simulate_federation("npz", str(path), "dirichlet", 2, 0.5, 0.2, 0.1, 32, seed=1) for _ in range(2))
    assert a.server_test.fingerprint() == b.server_test.fingerprint()
    assert [s.train.fingerprint() for s in a.sites] == [s.train.fingerprint() for s in b.sites]


def test_max_samples_caps_the_pool(tmp_path: Path) -> None:
    path = tmp_path / "pool.npz"
    _write_npz(path, _id_images(300), np.arange(300) % 3)
    fed = simulate_federation("npz", str(path), "iid", 2, 0.5, 0.2, 0.1, 32, seed=1, max_samples=100)
    assert len(fed.server_test) + sum(len(s.train) + len(s.test) for s in fed.sites) == 100


def test_digits_source() -> None:
    digits = load_source("digits", None, 32)
    assert digits.images.shape == (1797, 8, 8, 1)
    assert digits.images.dtype == np.uint8
    assert digits.images.max() == 255
    assert digits.classes == tuple("0123456789")


def test_image_folder_loads_resized_rgb(tmp_path: Path) -> None:
    _write_png(tmp_path / "cat" / "a.png", 10)
    _write_png(tmp_path / "cat" / "b.png", 20, size=(40, 30))
    _write_png(tmp_path / "dog" / "c.png", 200)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    samples = load_image_folder(tmp_path, 16)
    assert samples.classes == ("cat", "dog")
    assert samples.images.shape == (3, 16, 16, 3)
    assert samples.images.dtype == np.uint8
    assert samples.labels.tolist() == [0, 0, 1]
    assert samples.images[2].min() == 200


def test_image_folder_corrupt_image_names_the_file(tmp_path: Path) -> None:
    _write_png(tmp_path / "cat" / "a.png", 10)
    bad = tmp_path / "cat" / "broken.png"
    bad.write_bytes(b"\x89PNG definitely not an image")
    with pytest.raises(DataError) as info:
        load_image_folder(tmp_path, 16)
    assert str(bad) in str(info.value)


def test_image_folder_without_class_folders_is_refused(tmp_path: Path) -> None:
    _write_png(tmp_path / "loose.png", 10)
    with pytest.raises(DataError, match="no class folders"):
        load_image_folder(tmp_path, 16)


def test_image_folder_with_empty_class_folders_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_image_folder(tmp_path, 16)


def test_npz_pools_splits_and_flattens_labels(tmp_path: Path) -> None:
    path = tmp_path / "med.npz"
    images = _id_images(40)[..., 0]  # (N, H, W): grayscale without a channel axis
    _write_npz(path, images, np.arange(40) % 5)
    samples = load_npz(path)
    assert samples.images.shape == (40, 8, 8, 1)
    assert samples.labels.shape == (40,)
    assert samples.classes == ("0", "1", "2", "3", "4")
    assert np.array_equal(samples.labels, _ids(samples) % 5)


def test_npz_label_outside_classes_names_the_sample(tmp_path: Path) -> None:
    path = tmp_path / "med.npz"
    labels = np.arange(40) % 3
    labels[33] = 7  # in the test split, so pooled index 33
    _write_npz(path, _id_images(40), labels)
    with pytest.raises(DataError, match=r"sample 33 has label 7, outside the 3 classes"):
        load_npz(path, classes=("a", "b", "c"))
    labels[33] = -1
    _write_npz(path, _id_images(40), labels)
    with pytest.raises(DataError, match=r"sample 33 has label -1"):
        load_npz(path)


def test_npz_without_labels_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "med.npz"
    np.savez(path, train_images=_id_images(10))
    with pytest.raises(DataError, match=r"has train_images but no train_labels array$"):
        load_npz(path)
    np.savez(path, images=_id_images(10), labels=np.zeros(10, dtype=np.int64))
    with pytest.raises(DataError, match="MedMNIST format"):
        load_npz(path)


def test_npz_that_is_not_an_npz_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "med.npz"
    path.write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        load_npz(path)
    with path.open("wb") as f:
        np.save(f, _id_images(3))  # a plain .npy under a .npz name
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        load_npz(path)


def test_folders_split_with_one_image_folder_per_site(tmp_path: Path) -> None:
    for site, value in (("north", 40), ("south", 220)):
        for k in range(6):
            _write_png(tmp_path / site / ("cat" if k % 2 else "dog") / f"{k}.png", value)
    _write_png(tmp_path / "south" / "bird" / "x.png", 220)  # a class only one site has
    fed = simulate_federation("imagefolder", str(tmp_path), "folders", 2, 0.5, 0.3, 0.1, 16, seed=0)
    assert [s.name for s in fed.sites] == ["north", "south"]
    assert fed.sites[0].train.classes == ("bird", "cat", "dog")
    for site, value in zip(fed.sites, (40, 220), strict=True):
        assert (site.train.images == value).all(), f"{site.name} got another site's images"
        assert (site.test.images == value).all()
    assert len(fed.server_test) + sum(len(s.train) + len(s.test) for s in fed.sites) == 13


def test_folders_split_with_one_npz_per_site(tmp_path: Path) -> None:
    images = _id_images(60)
    _write_npz(tmp_path / "a.npz", images[:20], np.arange(20) % 2)
    _write_npz(tmp_path / "b.npz", images[20:], np.arange(40) % 4)
    fed = simulate_federation("npz", str(tmp_path), "folders", 2, 0.5, 0.2, 0.1, 32, seed=0)
    assert [s.name for s in fed.sites] == ["a", "b"]
    a_ids = np.concatenate([_ids(fed.sites[0].train), _ids(fed.sites[0].test)])
    b_ids = np.concatenate([_ids(fed.sites[1].train), _ids(fed.sites[1].test)])
    assert (a_ids < 20).all()
    assert (b_ids >= 20).all()
    assert fed.sites[0].train.classes == ("0", "1", "2", "3")


def test_folders_split_count_must_match_num_sites(tmp_path: Path) -> None:
    _write_npz(tmp_path / "a.npz", _id_images(20), np.arange(20) % 2)
    with pytest.raises(DataError, match=r"holds 1 site files, but data\.num_sites is 2"):
        simulate_federation("npz", str(tmp_path), "folders", 2, 0.5, 0.2, 0.1, 32, seed=0)


def test_site_with_fewer_than_two_samples_is_named(tmp_path: Path) -> None:
    one = Samples(_id_images(1), np.zeros(1, dtype=np.int64), ("0",))
    with pytest.raises(DataError, match=r"site tiny: has 1 samples"):
        site_split(one, "tiny", 0.2, seed=0)
    images = _id_images(30)
    _write_npz(tmp_path / "big.npz", images[:29], np.arange(29) % 2)
    np.savez(tmp_path / "small.npz", train_images=images[29:], train_labels=np.zeros((1, 1), dtype=np.int64))
    with pytest.raises(DataError, match=r"site small: has [01] samples"):
        simulate_federation("npz", str(tmp_path), "folders", 2, 0.5, 0.2, 0.1, 32, seed=0)
