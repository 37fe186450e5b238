"""Typed parsing of plain data (YAML, Flower run config) into frozen config dataclasses.

Shared by the run config (common/config/run.py) and a site's own file (common/config/site.py).
Every problem is a one-line `ConfigError` naming the key. A value echoed back in an error is
bounded (`shown`): a YAML file may hold aliases that expand to billions of items, and an
error message must never be what exhausts memory.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml
from fedtransfer.common.errors import InputError

SHOWN_CHARS = 80  # the most characters of a user's value an error message repeats


class ConfigError(InputError):
    """A configuration value is missing, unknown, of the wrong type or impossible."""


_REPR = reprlib.Repr()  # bounds depth and items per level, so even a self-referencing value prints short
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 2, 4, 4, 4, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = SHOWN_CHARS, SHOWN_CHARS, 40


def shown(value: object) -> str:
    """A user's value as an error repeats it: repr, at most SHOWN_CHARS characters, one line."""
    try:
        text = _REPR.repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        text = f"<{type(value).__name__}>"
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def require(ok: object, key: str, allowed: str, got: object) -> None:
    """Raise a ConfigError naming `key` and what is allowed unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}: {allowed} (got {shown(got)})")


def require_people_keys(
    source: str, user_column: str | None, users_file: str | None, prefix: str, files: str, source_key: str
) -> None:
    """Where a source names each record's person (privacy.unit: user), one rule for the run config's data section
    and a site's own file: `user_column` only for text, `users_file` only for an image folder or .npz (a table
    names its person column in its schema). `prefix` and `source_key` are the keys as that file spells them,
    `files` what the text column is a column of."""
    require(
        user_column is None or (source == "text" and user_column.strip()),
        f"{prefix}user_column",
        f"names a column of a text {files} (a table names its person column in its schema: user)",
        user_column,
    )
    require(
        users_file is None or (source in ("imagefolder", "npz") and users_file.strip()),
        f"{prefix}users_file",
        f"is a CSV naming each image's person, for {source_key} imagefolder or npz",
        users_file,
    )


def read_yaml(path: Path, what: str) -> Any:
    """Parse a YAML file; unreadable, undecodable or invalid text is a ConfigError naming the file."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"{path}: cannot read {what} ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); save the {what} as UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML") from None
    except (ValueError, OverflowError):  # PyYAML builds dates and numbers without checking them: 2024-13-45
        raise ConfigError(f"{path}: a value is not valid YAML (an impossible date or number)") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a {what}") from None


def build(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    """Instantiate dataclass `cls` from a mapping: unknown and missing keys are named."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'top level'}: must be a mapping of keys (got {shown(raw)})")
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{prefix}{_key(key)}: unknown key; allowed keys here: {', '.join(sorted(known))}")
    for f in dataclasses.fields(cls):
        if f.name not in raw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{f.name}: required key is missing")
    kwargs = {name: _coerce(hints[name], raw[name], f"{prefix}{name}") for name in known if name in raw}
    return cls(**kwargs)


def _key(key: object) -> str:
    """An unknown key as the error names it: plain when it is a short printable name, else bounded repr."""
    if isinstance(key, str) and key.isprintable() and 0 < len(key) <= 40:
        return key
    return shown(key)


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, f"{key}.")
    if origin in (Union, types.UnionType):
        inner = [a for a in get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value == ""):  # "" is how flattened TOML says null
            return None
        return _coerce(inner[0], value, key)
    if origin is Literal:
        choices = get_args(hint)
        if not isinstance(value, str | int) or value not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, choices))} (got {shown(value)})")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false (got {shown(value)})")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer (got {shown(value)})")
        return value
    if hint is float:
        return _number(value, key)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string (got {shown(value)})")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # a bug in this module, not user input


def _number(value: Any, key: str) -> float:
    if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        value = float(value)  # PyYAML (YAML 1.1) reads 1e-5, without a dot, as a string
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}: must be a finite number (got {shown(value)})")
    try:
        number = float(value)
    except OverflowError:  # an integer with hundreds of digits
        number = math.inf
    if not math.isfinite(number):
        raise ConfigError(f"{key}: must be a finite number (got {shown(value)})")
    return number
