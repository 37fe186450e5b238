"""A site's own YAML file: its data, its disk and the privacy limits it sets for itself.

The server never sends this file and cannot change it. Relative paths in it mean relative
to the file (not to wherever Flower starts the SuperNode); `site_paths` resolves them once
for the ClientApp, the auditor and the deploy checks alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fedtransfer.common.config.names import SITE_NAME_RULE, is_site_name
from fedtransfer.common.config.parse import ConfigError, build, read_yaml, require, require_people_keys
from fedtransfer.common.config.windows import WINDOW_RULE, is_window


@dataclass(frozen=True)
class SitePersonal:
    """The site's own say over its personal model (the run's `personal:`), which wins over the run config.

    The personal model never leaves the site, so how it trains is the site's business, not the
    coordinator's: a key left out (None) follows the run's `personal:`; a key given here wins,
    and every `personal-trained` record in the site's audit log says who chose (site or run).
    `keep: false` declines a personal model altogether (none trains, none is stored, only the
    global model's accuracy is reported), `keep: true` keeps one even where the run proposes none.
    `dp: true` makes the model (ε, δ)-DP for the site's records (so the site may publish it);
    `dp: false` trains it without noise (keep it inside the site).
    """

    keep: bool | None = None  # None: as the run's personal.enabled
    dp: bool | None = None
    target_epsilon: float | None = None  # the personal model's own ε over the whole run (with dp)

    def __post_init__(self) -> None:
        for key in ("dp", "target_epsilon"):  # how to train a model the site declines to keep is a contradiction
            require(
                self.keep is not False or getattr(self, key) is None,
                f"policy.personal.{key}",
                "says how the personal model trains, but policy.personal.keep is false; remove one of the two",
                getattr(self, key),
            )
        eps = self.target_epsilon
        require(eps is None or 0 < eps <= 100, "policy.personal.target_epsilon", "must be in (0, 100]", eps)
        require(
            eps is None or self.dp is not False,
            "policy.personal.target_epsilon",
            "is the budget of a DP-trained personal model, but policy.personal.dp is false; remove one of the two",
            eps,
        )


@dataclass(frozen=True)
class SitePolicy:
    """Limits a site sets for itself; the server's run config can only ask within them."""

    max_epsilon: float = 8.0
    max_delta: float = 1e-5
    max_rounds: int = 100
    min_noise_multiplier: float = 0.0
    max_clip_norm: float = 10.0
    require_dp: bool = True
    require_secure_aggregation: bool = False
    # privacy.trust: distributed: the site adds only its share of the noise, so its ε against the coordinator rests
    # on SecAgg+ and on the other surviving sites adding theirs; a site opts in to that
    allow_distributed_trust: bool = False
    # ... and on fewer than this many sites revealing their own shares to the coordinator: a site may require that
    # the run plan for at least this many (privacy.colluding_sites)
    min_colluding_sites: int = 0
    personal: SitePersonal = field(default_factory=SitePersonal)  # its own model: its choices win over the run's

    def __post_init__(self) -> None:
        require(self.max_epsilon > 0, "policy.max_epsilon", "must be > 0", self.max_epsilon)
        require(0 < self.max_delta < 1, "policy.max_delta", "must be in (0, 1)", self.max_delta)
        require(self.max_rounds >= 1, "policy.max_rounds", "must be >= 1", self.max_rounds)
        require(
            self.min_noise_multiplier >= 0, "policy.min_noise_multiplier", "must be >= 0", self.min_noise_multiplier
        )
        require(self.max_clip_norm > 0, "policy.max_clip_norm", "must be > 0", self.max_clip_norm)
        require(self.min_colluding_sites >= 0, "policy.min_colluding_sites", "must be >= 0", self.min_colluding_sites)


@dataclass(frozen=True)
class SiteConfig:
    """A site's own file, never sent by the server: its data, its disk, its privacy policy."""

    name: str
    data_source: Literal["imagefolder", "npz", "dicom", "mnist", "digits", "table", "text"]
    data_path: str | None = None
    text_column: str = "text"  # data_source text: the CSV column / JSONL key of each document ...
    label_column: str = "label"  # ... and of its class name
    user_column: str | None = None  # data_source text: the column / key naming each record's person (unit: user)
    data_schema: str | None = None  # data_source table: the site's own copy of the run's schema file (same fingerprint)
    users_file: str | None = None  # imagefolder, npz: a CSV naming each record's person (path,user / index,user)
    labels_file: str | None = None  # data_source dicom: a CSV image,label[,person] (relative to this file)
    window: str = "file"  # data_source dicom: file | lung | mediastinum | bone | brain | W/L (e.g. 400/40)
    frames: Literal["refuse", "each"] = "refuse"  # data_source dicom: a multi-frame file refused, or one record a frame
    test_fraction: float = 0.2
    device: Literal["auto", "cpu", "cuda"] = "auto"
    state_dir: str = "~/.fedtransfer/site"
    cache_dir: str | None = None
    accept_app_version: str | None = None
    policy: SitePolicy = field(default_factory=SitePolicy)

    def __post_init__(self) -> None:
        require(is_site_name(self.name), "name", f"not a site name: {SITE_NAME_RULE}", self.name)
        needs_path = self.data_source in ("imagefolder", "npz", "dicom", "table", "text")
        require(not needs_path or self.data_path, "data_path", f"data_source {self.data_source} needs it", None)
        is_table = self.data_source == "table"
        require(
            is_table == bool(self.data_schema),
            "data_schema",
            "data_source table needs it (only it takes one)",
            self.data_schema,
        )
        require(
            (self.data_source == "dicom") == bool(self.labels_file and self.labels_file.strip()),
            "labels_file",
            "a CSV image,label[,person] is needed with data_source dicom, and only there",
            self.labels_file,
        )
        require(is_window(self.window), "window", WINDOW_RULE, self.window)
        require_people_keys(self.data_source, self.user_column, self.users_file, "", "site's file", "data_source")
        require(0 < self.test_fraction < 1, "test_fraction", "must be in (0, 1)", self.test_fraction)


def load_site_config(path: str | Path) -> SiteConfig:
    """Read a site's YAML file; problems are one-line ConfigErrors naming the file."""
    path = Path(path)
    raw = read_yaml(path, "site config")
    try:
        return build(SiteConfig, {} if raw is None else raw, "")
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


@dataclass(frozen=True)
class SitePaths:
    """Where a deployed site's files are, every relative path resolved against its config file."""

    config: Path  # the site's YAML file itself: every error about its data names it
    data: Path | None  # the data_path (None for the built-in sources)
    state_dir: Path  # ledger, audit log, secret seed, reply cache
    cache_dir: Path  # cached features (default: state_dir/features)
    schema: Path | None = None  # a table's schema file (data_schema)
    users: Path | None = None  # an image folder's or .npz's users file (users_file)
    labels: Path | None = None  # a DICOM folder's labels CSV (labels_file)


def site_paths(site: SiteConfig, config_path: Path) -> SitePaths:
    """Resolve the site's paths the one way every reader of a site config must."""

    def local(value: str) -> Path:
        return (config_path.parent / Path(value).expanduser()).resolve()

    state_dir = local(site.state_dir)
    cache_dir = local(site.cache_dir) if site.cache_dir else state_dir / "features"
    schema = local(site.data_schema) if site.data_schema else None
    users = local(site.users_file) if site.users_file else None
    labels = local(site.labels_file) if site.labels_file else None
    data = local(site.data_path) if site.data_path else None
    return SitePaths(config_path, data, state_dir, cache_dir, schema, users, labels)


def check_site_files(site: SiteConfig, paths: SitePaths) -> None:
    """Refuse, before a SuperNode connects, a site whose data_path or users_file is not there (one line, exit 2)."""
    if paths.data is not None and not paths.data.exists():
        raise ConfigError(f"{paths.config}: data_path: {site.data_path} does not exist")
    if paths.users is not None and not paths.users.is_file():
        raise ConfigError(
            f"{paths.config}: users_file: {site.users_file} is not a file (a CSV path,user or "
            "index,user; relative paths are relative to this file)"
        )
    if paths.labels is not None and not paths.labels.is_file():
        raise ConfigError(
            f"{paths.config}: labels_file: {site.labels_file} is not a file (a CSV image,label[,person]; "
            "relative paths are relative to this file)"
        )


def data_error_line(site: SiteConfig, paths: SitePaths, error: str) -> str:
    """A loader's one-line DataError, prefixed with the site's file and the key whose file or column is at fault.

    Every loader's message starts with the file at fault, so one about the users file names users_file
    (the schema file: data_schema); one that names the site's person column (empty, missing, of the wrong
    type) names user_column; any other is about the data itself (data_path, with its columns).
    """
    files = {"users_file": paths.users, "data_schema": paths.schema, "labels_file": paths.labels}
    key = next((k for k, file in files.items() if file is not None and error.startswith(f"{file}:")), "data_path")
    if key == "data_path" and site.user_column is not None and repr(site.user_column) in error:
        key = "user_column"
    return f"{paths.config}: {key}: {error}"
