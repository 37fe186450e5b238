"""The declared columns of a table and their public preprocessing: a schema YAML file.

Every number that shapes a tabular feature (a numeric column's clip range, centre and scale;
a categorical column's category list; the value that fills a missing cell; the random-feature
seed) is written in this file in advance. None is ever computed from a site's records: a mean,
a standard deviation or the categories a site happens to hold are statistics of private data,
and computing them outside the DP accounting would leak them. A schema that leaves such a value
to be "learnt" (no range, `scale: standard`, `categories: auto`) is refused with one line naming
the key.

The parsed schema is plain data (`to_dict`), so it enters the encoder's describe(): the
fingerprint, the feature-cache key and the exported model all cover it, and `predict` needs no
schema file. This module imports no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fedtransfer.common.config.parse import ConfigError, read_yaml, shown
from fedtransfer.common.config.parse import require as _check

MAX_COLUMNS = 1000
MAX_CATEGORIES = 1000
MAX_RANDOM_FEATURES = 16_384
DATA_DEPENDENT = (
    "fedtransfer never computes it from a site's records (a statistic of private data outside the DP "
    "accounting); declare it from public knowledge"
)
# cell texts that mean "missing" when a schema lists none: R's NA, pandas' NaN/nan, spreadsheets' N/A, SQL's NULL
DEFAULT_MISSING = ("", "NA", "N/A", "n/a", "NaN", "nan", "NULL", "null")
_LEARNT = {"auto", "data", "mean", "median", "std", "standard", "standardize", "minmax", "fit", "learn", "infer"}


@dataclass(frozen=True)
class NumericColumn:
    """A number, clipped to [low, high] then mapped to (x - center) / scale."""

    name: str
    low: float
    high: float
    center: float
    scale: float
    missing: Literal["error", "fill", "indicator"]
    fill: float | None  # the value a missing cell takes (fill, indicator); inside [low, high]


@dataclass(frozen=True)
class CategoricalColumn:
    """One of the declared categories, one-hot, with one more slot for anything else ("other")."""

    name: str
    categories: tuple[str, ...]
    missing: Literal["error", "other", "fill"]
    fill: str | None  # the declared category a missing cell takes (fill)
    ignore_case: bool = False  # "YES" is the category "yes": files exported by other tools change the case

    def index(self, text: str) -> int | None:
        """The category `text` names (case-folded when `ignore_case`), or None for an unknown one ("other")."""
        if self.ignore_case:
            text = text.casefold()
            return next((k for k, c in enumerate(self.categories) if c.casefold() == text), None)
        return self.categories.index(text) if text in self.categories else None


Column = NumericColumn | CategoricalColumn


@dataclass(frozen=True)
class RandomFeatures:
    """Random Fourier features of the preprocessed row: fixed by a seed, so data-independent and free of ε."""

    dim: int
    seed: int
    lengthscale: float


@dataclass(frozen=True)
class TableSchema:
    columns: tuple[Column, ...]
    label: str  # the label column: training files have it; predict takes files with or without it
    classes: tuple[str, ...]
    ignore: tuple[str, ...]  # columns a file may hold that are not used (an id column)
    missing_values: tuple[str, ...]  # cell texts that mean "missing"
    random_features: RandomFeatures | None
    user: str | None = None  # the column naming each row's person (privacy.unit: user): never a feature

    @property
    def base_dim(self) -> int:
        """Width of the preprocessed row: numeric values (+ missing indicators), one-hots and a constant 1."""
        width = 1
        for c in self.columns:
            width += (1 + (c.missing == "indicator")) if isinstance(c, NumericColumn) else len(c.categories) + 1
        return width

    @property
    def feature_dim(self) -> int:
        return self.base_dim + (self.random_features.dim if self.random_features else 0)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the same keys a schema file has) that `schema_from_dict` reads back unchanged."""
        columns: dict[str, Any] = {}
        for c in self.columns:
            if isinstance(c, NumericColumn):
                columns[c.name] = {
                    "type": "numeric",
                    "range": [c.low, c.high],
                    "center": c.center,
                    "scale": c.scale,
                    "missing": c.missing,
                    "fill": c.fill,
                }
            else:
                columns[c.name] = {
                    "type": "categorical",
                    "categories": list(c.categories),
                    "missing": c.missing,
                    "fill": c.fill,
                } | ({"ignore_case": True} if c.ignore_case else {})  # absent when unset: older digests hold
        rf = self.random_features
        return {
            "columns": columns,
            "label": {"column": self.label, "classes": list(self.classes)},
            "ignore": list(self.ignore),
            "missing_values": list(self.missing_values),
            "random_features": None if rf is None else {"dim": rf.dim, "seed": rf.seed, "lengthscale": rf.lengthscale},
        } | ({} if self.user is None else {"user": self.user})  # absent when unset: older schemas keep their digest


def load_schema(path: str | Path) -> TableSchema:
    """Read and validate a schema YAML file; every problem is one ConfigError line naming the file and key."""
    path = Path(path).expanduser()
    raw = read_yaml(path, "table schema")
    try:
        return schema_from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def schema_from_dict(raw: Any) -> TableSchema:
    """A TableSchema from plain data (a schema file, or the describe() of a saved encoder)."""
    top = _mapping(raw, "top level", {"columns", "label", "ignore", "missing_values", "random_features", "user"})
    columns = _mapping(top.get("columns"), "columns", None)
    _check(0 < len(columns) <= MAX_COLUMNS, "columns", f"declare 1..{MAX_COLUMNS} columns", len(columns))
    parsed = tuple(_column(str(name), spec) for name, spec in columns.items())
    label = _label(top.get("label"))
    ignore = _names(top.get("ignore", []), "ignore")
    missing = _names(top.get("missing_values", list(DEFAULT_MISSING)), "missing_values")
    user = top.get("user")
    _check(
        user is None or (isinstance(user, str) and user.strip()),
        "user",
        "must name the column holding each row's person (privacy.unit: user)",
        user,
    )
    used = [c.name for c in parsed] + [label[0]] + list(ignore) + ([user] if user else [])
    twice = sorted({n for n in used if used.count(n) > 1})
    _check(not twice, "columns", "a column is declared twice (columns, label, ignore, user)", twice)
    rf = _random_features(top.get("random_features"))
    return TableSchema(parsed, label[0], label[1], ignore, missing, rf, user)


def _column(name: str, spec: Any) -> Column:
    key = f"columns.{name}"
    kind = _mapping(spec, key, None).get("type")
    if kind == "numeric":
        return _numeric(name, spec, key)
    if kind == "categorical":
        return _categorical(name, spec, key)
    raise ConfigError(f"{key}.type: must be numeric or categorical (got {shown(kind)})")


def _numeric(name: str, spec: dict[str, Any], key: str) -> NumericColumn:
    _mapping(spec, key, {"type", "range", "center", "scale", "missing", "fill"})
    for setting in ("range", "center", "scale", "fill"):  # "scale: standard" is named as such, before any other check
        _not_learnt(spec.get(setting), f"{key}.{setting}")
    bounds = spec.get("range")
    _check(
        bounds is not None,
        f"{key}.range",
        f"a numeric column needs a declared [low, high] clip range; {DATA_DEPENDENT}",
        bounds,
    )
    _check(isinstance(bounds, list) and len(bounds) == 2, f"{key}.range", "must be [low, high]", bounds)
    low, high = _number(bounds[0], f"{key}.range"), _number(bounds[1], f"{key}.range")
    _check(low < high, f"{key}.range", "low must be below high", bounds)
    center = _number(spec.get("center", low), f"{key}.center")
    scale = _number(spec.get("scale", high - low), f"{key}.scale")
    _check(scale > 0, f"{key}.scale", "must be > 0", scale)
    missing = spec.get("missing", "error")
    _check(missing in ("error", "fill", "indicator"), f"{key}.missing", "must be error, fill or indicator", missing)
    fill = spec.get("fill")
    if missing == "error":
        _check(fill is None, f"{key}.fill", "only with missing: fill or indicator", fill)
        return NumericColumn(name, low, high, center, scale, missing, None)
    value = _number(fill, f"{key}.fill")
    _check(low <= value <= high, f"{key}.fill", f"must lie in the declared range [{low:g}, {high:g}]", fill)
    return NumericColumn(name, low, high, center, scale, missing, value)


def _categorical(name: str, spec: dict[str, Any], key: str) -> CategoricalColumn:
    _mapping(spec, key, {"type", "categories", "missing", "fill", "ignore_case"})
    ignore_case = spec.get("ignore_case", False)
    _check(isinstance(ignore_case, bool), f"{key}.ignore_case", "must be true or false", ignore_case)
    cats = spec.get("categories")
    _not_learnt(cats, f"{key}.categories")
    _check(
        cats is not None, f"{key}.categories", f"a categorical column needs its category list; {DATA_DEPENDENT}", cats
    )
    categories = _names(cats, f"{key}.categories")
    _check(
        0 < len(categories) <= MAX_CATEGORIES,
        f"{key}.categories",
        f"list 1..{MAX_CATEGORIES} categories",
        len(categories),
    )
    _check(len(set(categories)) == len(categories), f"{key}.categories", "a category is listed twice", categories)
    folded = {c.casefold() for c in categories}
    _check(
        not ignore_case or len(folded) == len(categories),
        f"{key}.categories",
        "two categories differ only in case, which ignore_case: true cannot tell apart",
        categories,
    )
    missing = spec.get("missing", "error")
    _check(missing in ("error", "other", "fill"), f"{key}.missing", "must be error, other or fill", missing)
    fill = spec.get("fill")
    if missing != "fill":
        _check(fill is None, f"{key}.fill", "only with missing: fill", fill)
        return CategoricalColumn(name, categories, missing, None, ignore_case)
    _check(
        isinstance(fill, str | int) and str(fill) in categories,
        f"{key}.fill",
        "must be one of the declared categories",
        fill,
    )
    return CategoricalColumn(name, categories, missing, str(fill), ignore_case)


def _label(raw: Any) -> tuple[str, tuple[str, ...]]:
    spec = _mapping(raw, "label", {"column", "classes"})
    column = spec.get("column")
    _check(isinstance(column, str) and column, "label.column", "must name the label column", column)
    classes = spec.get("classes")
    _not_learnt(classes, "label.classes")
    _check(
        classes is not None,
        "label.classes",
        "list the class names (the first is the negative class of a yes/no task)",
        classes,
    )
    names = _names(classes, "label.classes")
    _check(2 <= len(names) <= MAX_CATEGORIES, "label.classes", f"list 2..{MAX_CATEGORIES} classes", len(names))
    _check(len(set(names)) == len(names), "label.classes", "a class is listed twice", names)
    return column, names


def _random_features(raw: Any) -> RandomFeatures | None:
    if raw is None:
        return None
    spec = _mapping(raw, "random_features", {"dim", "seed", "lengthscale"})
    dim, seed = spec.get("dim"), spec.get("seed", 0)
    _check(
        type(dim) is int and 1 <= dim <= MAX_RANDOM_FEATURES,
        "random_features.dim",
        f"must be an integer 1..{MAX_RANDOM_FEATURES}",
        dim,
    )
    _check(type(seed) is int and 0 <= seed < 2**32, "random_features.seed", "must be an integer 0..2**32-1", seed)
    _not_learnt(spec.get("lengthscale"), "random_features.lengthscale")
    lengthscale = _number(spec.get("lengthscale", 1.0), "random_features.lengthscale")
    _check(lengthscale > 0, "random_features.lengthscale", "must be > 0", lengthscale)
    return RandomFeatures(dim, seed, lengthscale)


def _not_learnt(value: Any, key: str) -> None:
    """A value left to be computed from the data ("auto", "mean", ...) is refused: see DATA_DEPENDENT."""
    if isinstance(value, str) and value.strip().lower() in _LEARNT:
        raise ConfigError(f"{key}: {shown(value)} would be computed from the records; {DATA_DEPENDENT}")


def _mapping(raw: Any, key: str, allowed: set[str] | None) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: must be a mapping of keys (got {shown(raw)})")
    unknown = sorted(str(k) for k in raw if allowed is not None and k not in allowed)
    _check(
        not unknown, f"{key}.{unknown[0] if unknown else ''}", f"unknown key; allowed: {sorted(allowed or ())}", unknown
    )
    return raw


def _names(raw: Any, key: str) -> tuple[str, ...]:
    _check(isinstance(raw, list), key, "must be a list", raw)
    _check(
        all(isinstance(v, str | int) and not isinstance(v, bool) for v in raw),
        key,
        "must list strings (quote yes/no, which YAML reads as true/false)",
        raw,
    )
    return tuple(str(v) for v in raw)


def _number(value: Any, key: str) -> float:
    _check(isinstance(value, int | float) and not isinstance(value, bool), key, "must be a number", value)
    number = float(value)
    _check(math.isfinite(number), key, "must be finite", value)
    return number
