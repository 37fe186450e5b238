"""`fedtransfer data check`: what a site's data holds and what is wrong with it, before it joins; nothing is sent.

A site learns here, not in round 3, that a file will not decode, that a label names no file, that
the same pixels sit in its train and test splits (its accuracy would be inflated), or that one
person has records on both sides. The check reads the data as the run would (same loader, same
split, same seed) but lists every problem instead of stopping at the first one.

Errors (exit 1): a file unreadable or refused, a label naming no file, identical pixels on both sides
of a split, no record at all. Warnings (exit 0): persons with records on both sides (the split is by
record, so their test records are not unseen people: usual when a patient has several images, and
`privacy.unit: user` still counts each person once), files under the folder that no label names.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fedtransfer.common.config.run import RunConfig
from fedtransfer.common.config.site import SiteConfig, SitePaths
from fedtransfer.common.data.dicom_set import DicomOptions, scan_dicom
from fedtransfer.common.data.federation import (
    Federation,
    deployed_site_data,
    dicom_options,
    federation_for,
    simulate_federation,
    site_dicom_options,
    site_split,
)
from fedtransfer.common.data.files import DataError
from fedtransfer.common.data.sources import Samples, dicom_samples


@dataclass
class DataCheck:
    """The report: JSON-ready fields, no identifier (persons appear as counts and salted pseudonyms)."""

    source: str
    config: str
    window: str | None = None
    classes: list[str] = field(default_factory=list)
    splits: dict[str, dict] = field(default_factory=dict)  # name -> records, per class, persons
    image_sizes: dict[str, int] = field(default_factory=dict)  # "ROWSxCOLUMNS" -> files
    bit_depths: dict[str, int] = field(default_factory=dict)  # bits stored -> files
    windows_used: dict[str, int] = field(default_factory=dict)  # the VOI each file was shown through -> files
    syntaxes: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.errors


def check_site(site: SiteConfig, paths: SitePaths, image_size: int) -> DataCheck:
    """A deployed site's file: its records split as its ClientApp splits them (test_fraction, seed 0)."""
    report = DataCheck(site.data_source, str(paths.config), site.window if site.data_source == "dicom" else None)
    options = site_dicom_options(site, paths)
    try:
        if options is None:
            data = deployed_site_data(site, paths, image_size)
        else:
            pool = _scanned(options, image_size, report)
            data = site_split(pool, site.name, site.test_fraction, seed=0) if pool is not None else None
    except DataError as err:
        report.errors.append(str(err))
        return report
    if data is not None:
        _describe(report, {"train": data.train, "test": data.test}, train=["train"])
    return report


def check_run(cfg: RunConfig, config_path: Path) -> DataCheck:
    """A simulation config: the server's hold-out and each site's train and test split, as the run makes them."""
    d = cfg.data
    report = DataCheck(d.source, str(config_path), d.window if d.source == "dicom" else None)
    options = dicom_options(cfg)
    try:
        if options is None:
            fed = federation_for(cfg)
        else:
            pool = _scanned(options, cfg.backbone.image_size, report)
            if pool is None:
                return report
            fed = _simulated(cfg, pool, options)
    except DataError as err:
        report.errors.append(str(err))
        return report
    splits = {"server-test": fed.server_test}
    for site in fed.sites:
        splits |= {f"{site.name}/train": site.train, f"{site.name}/test": site.test}
    _describe(report, splits, train=[f"{s.name}/train" for s in fed.sites])
    return report


def _simulated(cfg: RunConfig, pool: Samples, options: DicomOptions) -> Federation:
    d = cfg.data
    return simulate_federation(
        d.source,
        d.path,
        d.split,
        d.num_sites,
        d.alpha,
        d.site_test_fraction,
        d.server_test_fraction,
        cfg.backbone.image_size,
        cfg.seed,
        d.max_samples,
        min_records=d.min_site_records,
        small_sites=d.small_sites,
        dicom=options,
        pool=pool,
    )


def _scanned(options: DicomOptions, image_size: int, report: DataCheck) -> Samples | None:
    """Every labelled file read, each problem listed; the records that could be read, or None."""
    scan = scan_dicom(options, image_size, strict=False)
    report.errors += scan.problems
    for facts in scan.files:
        _count(report.image_sizes, f"{facts.rows}x{facts.columns}")
        _count(report.bit_depths, str(facts.bits_stored))
        _count(report.windows_used, facts.window)
        _count(report.syntaxes, facts.syntax)
    if scan.unlabelled:
        report.warnings.append(f"{scan.unlabelled} files under {options.root} are named by no line of {options.labels}")
    if not scan.inputs:
        report.errors.append(f"{options.labels}: none of the images it lists could be read")
        return None
    return dicom_samples(scan, options)


def _count(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


def _describe(report: DataCheck, splits: dict[str, Samples], *, train: list[str]) -> None:
    """Records per class and split, persons per split, and what crosses from a train split to a test split."""
    first = next(iter(splits.values()))
    report.classes = list(first.classes)
    for name, samples in splits.items():
        per_class = Counter(first.classes[k] for k in samples.labels.tolist())
        persons = None if samples.users is None else len(set(samples.users.tolist()))
        report.splits[name] = {"records": len(samples), "per_class": dict(per_class), "persons": persons}
    tests = [name for name in splits if name not in train]
    _crossing_pixels(report, splits, train, tests)
    _crossing_persons(report, splits, train, tests)


def _digests(samples: Samples) -> list[str]:
    inputs = np.asarray(samples.inputs)
    if inputs.dtype == object:
        return [hashlib.sha256(repr(x).encode()).hexdigest() for x in inputs]
    return [hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest() for x in inputs]


def _crossing_pixels(report: DataCheck, splits: dict[str, Samples], train: list[str], tests: list[str]) -> None:
    """Identical records in a train split and a test split: the test would score what was trained on."""
    seen = {d: name for name in train for d in _digests(splits[name])}
    for name in tests:
        crossing = Counter(seen[d] for d in _digests(splits[name]) if d in seen)
        for other, count in sorted(crossing.items()):
            report.errors.append(
                f"duplicate pixel data: {count} records of {name} are identical to records of {other}; "
                "remove the copies so that the test split is unseen"
            )


def _crossing_persons(report: DataCheck, splits: dict[str, Samples], train: list[str], tests: list[str]) -> None:
    """Persons with records on both sides: their test records are not an unseen person's."""
    if any(splits[n].users is None for n in splits):
        return
    trained = set().union(*(set(splits[n].users.tolist()) for n in train))
    for name in tests:
        both = sorted(trained & set(splits[name].users.tolist()))
        if both:
            report.warnings.append(
                f"person on both sides: {len(both)} persons with records in {name} also have records in a train "
                f"split (e.g. pseudonym {both[0]}); the split is by record, so their test records are not unseen"
            )
