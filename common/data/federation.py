"""How a source's records are shared out: the server's hold-out, IID or Dirichlet sites, a site's own split.

A simulation splits one source between its sites (`federation_for`); a deployed site reads its own
records and splits off its test set with a fixed seed (`deployed_site_data`), so its test split never moves.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import WARNING
from pathlib import Path

import numpy as np
from fedtransfer.common.config.run import RunConfig
from fedtransfer.common.config.site import SiteConfig, SitePaths, data_error_line
from fedtransfer.common.config.windows import parse_window
from fedtransfer.common.data.dicom_set import DicomOptions
from fedtransfer.common.data.files import (
    DataError,
)
from fedtransfer.common.data.sources import (
    TEXT_COLUMNS,
    Samples,
    SiteData,
    checked_samples,
    load_image_folder,
    load_npz,
    load_source,
    load_table,
)
from fedtransfer.common.data.texts import TEXT_SUFFIXES, load_text_files
from flwr.common.logger import log


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
    dicom: DicomOptions | None = None,
    pool: Samples | None = None,
) -> Federation:
    """Split one source between a server hold-out and `num_sites` sites, deterministically.

    `classes` orders a text source's classes (data.classes); a site of fewer than `min_records` records
    (data.min_site_records) is refused, or warned about when `small_sites` is "warn". `dicom`: a DICOM
    source's options; `pool`: the records already read (the data check reads them, listing every problem).
    """
    if split == "folders":
        pool, owners, names = _load_site_folders(
            source, Path(path or ""), image_size, num_sites, schema, columns, users, classes=classes
        )
    else:
        if pool is None:
            pool = load_source(source, path, image_size, schema, columns, users, classes, dicom)
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
        dicom=dicom_options(cfg),
    )


def dicom_options(cfg: RunConfig) -> DicomOptions | None:
    """A simulation's DICOM options; person hashes are salted by a file in its cache_dir."""
    d = cfg.data
    if d.source != "dicom" or d.path is None or d.labels_file is None:
        return None
    root, labels = Path(d.path).expanduser(), Path(d.labels_file).expanduser()
    return DicomOptions(root, labels, parse_window(d.window), d.frames, cfg.cache_path)


def site_dicom_options(site: SiteConfig, paths: SitePaths) -> DicomOptions | None:
    """A deployed site's DICOM options; person hashes are salted by a file in its state_dir, beside its secrets."""
    if site.data_source != "dicom" or paths.data is None or paths.labels is None:
        return None
    return DicomOptions(paths.data, paths.labels, parse_window(site.window), site.frames, paths.state_dir)


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
            site_dicom_options(site, paths),
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
        loaded = [
            checked_samples(x, y, classes, str(p), u) for x, y, u, p in zip(texts, labels, people, entries, strict=True)
        ]
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
