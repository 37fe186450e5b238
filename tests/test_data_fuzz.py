"""Fuzzed loaders: whatever the bytes, a loader returns valid samples or raises one DataError line.

A site's data is whatever its owner exported. Any other exception type escaping a loader is a
traceback instead of an instruction, so each test here feeds the loaders arbitrary .npz
contents, and valid .npz, PNG and JPEG files with bytes flipped, inserted or cut off.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fedtransfer.common.data.sources import MAX_CLASSES, DataError, Samples, load_image_folder, load_npz
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

FUZZ = settings(
    max_examples=120,
    deadline=None,  # the first decode of a run imports codecs; examples are bounded by count instead
    suppress_health_check=[HealthCheck.function_scoped_fixture],  # every example rewrites the same file
    derandomize=True,  # CI reruns the same examples; a failure is reproducible from the log
)
MEMBERS = [f"{split}_{kind}" for split in ("train", "val", "test") for kind in ("images", "labels")]
DTYPES = st.sampled_from([np.uint8, np.int8, np.int64, np.uint64, np.float32, np.bool_, np.uint16])


def _valid_or_refused(load: Callable[[], Samples], path: Path) -> None:
    """The loader's contract: valid samples, or a one-line DataError that names `path`."""
    try:
        samples = load()
    except DataError as err:
        message = str(err)
        assert "\n" not in message, message
        assert str(path) in message, message
        return
    inputs, labels = samples.inputs, samples.labels
    assert inputs.dtype == np.uint8 and inputs.ndim == 4 and inputs.shape[-1] in (1, 3)
    assert labels.dtype == np.int64 and labels.shape == (len(inputs),) and len(inputs) > 0
    assert 0 < len(samples.classes) <= MAX_CLASSES
    assert labels.min() >= 0 and labels.max() < len(samples.classes)


def _npz_bytes(compressed: bool) -> bytes:
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (12, 6, 6), dtype=np.uint8),
        "train_labels": (np.arange(12) % 3)[:, None],
        "test_images": rng.integers(0, 256, (4, 6, 6), dtype=np.uint8),
        "test_labels": np.arange(4) % 3,
    }
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


# A valid image of each kind the loaders accept: (PIL format, 16-bit grayscale?, suffix).
IMAGE_KINDS = {
    "png": ("PNG", False, ".png"),
    "png16": ("PNG", True, ".png"),
    "jpeg": ("JPEG", False, ".jpg"),
    "gif": ("GIF", False, ".gif"),
    "bmp": ("BMP", False, ".bmp"),
    "tiff": ("TIFF", False, ".tif"),
    "tiff16": ("TIFF", True, ".tif"),
    "webp": ("WEBP", False, ".webp"),
}


def _image_bytes(kind: str) -> bytes:
    image_format, deep, _ = IMAGE_KINDS[kind]
    rng = np.random.default_rng(1)
    if deep:
        img = Image.fromarray(rng.integers(0, 65536, (16, 16), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    img.save(buffer, format=image_format)
    return buffer.getvalue()


@st.composite
def damaged(draw: st.DrawFn, original: bytes) -> bytes:
    """`original` with a few bytes overwritten, a run inserted, and/or the tail cut off."""
    data = bytearray(original)
    for _ in range(draw(st.integers(0, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=16))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@st.composite
def npz_members(draw: st.DrawFn) -> dict[str, np.ndarray | bytes]:
    """Some MedMNIST member names (and a stray one) holding arrays of any dtype and shape, or raw bytes."""
    names = draw(st.lists(st.sampled_from([*MEMBERS, "images", "train_images_extra"]), unique=True, max_size=5))
    members: dict[str, np.ndarray | bytes] = {}
    for name in names:
        if draw(st.integers(0, 9)) == 0:
            members[name] = draw(st.binary(max_size=32))  # not a .npy at all
            continue
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
        members[name] = draw(hnp.arrays(draw(DTYPES), shape))
    return members


def _write_members(path: Path, members: dict[str, np.ndarray | bytes]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, value in members.items():
            if isinstance(value, bytes):
                archive.writestr(f"{name}.npy", value)
            else:
                with archive.open(f"{name}.npy", "w") as member:
                    np.lib.format.write_array(member, value, allow_pickle=False)


@FUZZ
@given(members=npz_members())
def test_npz_with_any_members_is_loaded_or_refused(tmp_path: Path, members: dict[str, np.ndarray | bytes]) -> None:
    path = tmp_path / "site.npz"
    _write_members(path, members)
    _valid_or_refused(lambda: load_npz(path), path)


@FUZZ
@given(images=st.integers(1, 6), labels=st.integers(0, 12), label_dims=st.sampled_from([(), (1,), (2,)]))
def test_npz_label_count_must_match_image_count(
    tmp_path: Path, images: int, labels: int, label_dims: tuple[int, ...]
) -> None:
    path = tmp_path / "site.npz"
    label_array = np.zeros((labels, *label_dims), dtype=np.int64)
    np.savez(path, train_images=np.zeros((images, 4, 4), dtype=np.uint8), train_labels=label_array)
    paired = labels == images and label_dims != (2,)
    if paired:
        assert len(load_npz(path)) == images
    else:
        with pytest.raises(DataError, match="train_labels"):
            load_npz(path)


@FUZZ
@given(label=st.integers(-(2**63), 2**63 - 1))
def test_npz_any_label_value_is_loaded_or_refused(tmp_path: Path, label: int) -> None:
    path = tmp_path / "site.npz"
    np.savez(path, train_images=np.zeros((3, 4, 4), dtype=np.uint8), train_labels=np.array([0, label, 1]))
    if 0 <= label < MAX_CLASSES:
        samples = load_npz(path)
        assert samples.labels.tolist() == [0, label, 1]
        assert len(samples.classes) == max(label, 1) + 1
    else:
        with pytest.raises(DataError, match=rf"{re.escape(str(path))}: sample 1 has label {label}\b"):
            load_npz(path)


@pytest.mark.parametrize("compressed", [False, True])
@FUZZ
@given(data=st.data())
def test_damaged_npz_is_loaded_or_refused(tmp_path: Path, compressed: bool, data: st.DataObject) -> None:
    path = tmp_path / "site.npz"
    path.write_bytes(data.draw(damaged(_npz_bytes(compressed))))
    _valid_or_refused(lambda: load_npz(path), path)


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about damaged metadata, then decodes
@pytest.mark.parametrize("kind", sorted(IMAGE_KINDS))
@FUZZ
@given(data=st.data())
def test_damaged_image_is_loaded_or_refused(tmp_path: Path, kind: str, data: st.DataObject) -> None:
    file = tmp_path / "cls" / f"x{IMAGE_KINDS[kind][2]}"
    file.parent.mkdir(exist_ok=True)
    file.write_bytes(data.draw(damaged(_image_bytes(kind))))
    _valid_or_refused(lambda: load_image_folder(tmp_path, 8), file)


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about damaged metadata, then decodes
@FUZZ
@given(blob=st.binary(max_size=256), suffix=st.sampled_from([".png", ".jpg", ".gif", ".tif", ".bmp", ".webp"]))
def test_arbitrary_bytes_as_an_image_are_loaded_or_refused(tmp_path: Path, blob: bytes, suffix: str) -> None:
    for old in tmp_path.glob("cls/*"):
        old.unlink()
    file = tmp_path / "cls" / f"x{suffix}"
    file.parent.mkdir(exist_ok=True)
    file.write_bytes(blob)
    _valid_or_refused(lambda: load_image_folder(tmp_path, 8), file)
