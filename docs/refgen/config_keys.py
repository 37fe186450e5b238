"""The config reference, read from the config dataclasses themselves: every key, its type, default and meaning.

Generated at build time (docs/hooks.py) so that a key added to `RunConfig` or `SiteConfig` shows up
in the manual without anyone remembering to write it down. A key's meaning is the comment beside
(or just above) its field in the source; a key the source leaves uncommented takes its meaning from
docs/refgen/config-meanings.yaml. tests/test_docs.py fails when a key has neither.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

MEANINGS_FILE = Path(__file__).with_name("config-meanings.yaml")


@dataclass(frozen=True)
class Key:
    """One config key as the reference lists it."""

    name: str  # dotted, as a YAML file nests it ("train.rounds")
    type: str
    default: str
    meaning: str


def field_comments(cls: type) -> dict[str, str]:
    """The comment beside each field (or enum member) of `cls`, or the comment lines just above it."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    found: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:  # an enum member
            target = node.targets[0]
        if not isinstance(target, ast.Name):
            continue
        above: list[str] = []
        row = node.lineno - 1
        while row in comments and lines[row - 1].lstrip().startswith("#"):
            above.insert(0, comments[row])
            row -= 1
        parts = [*above, comments.get(node.end_lineno or node.lineno, "")]
        found[target.id] = " ".join(p for p in parts if p)
    return found


def _type_name(hint: Any) -> str:
    """A field's type as a YAML writer reads it: `int`, `float or null`, `"fedavg" | "fedsgd"`."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return " \\| ".join(f'"{v}"' for v in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        named = " or ".join(_type_name(a) for a in args)
        return f"{named} or null" if len(args) < len(typing.get_args(hint)) else named
    return {"str": "string", "bool": "bool", "int": "int", "float": "float"}.get(hint.__name__, hint.__name__)


def _default(field: dataclasses.Field[Any]) -> str:
    if field.default is dataclasses.MISSING:
        return "required" if field.default_factory is dataclasses.MISSING else "(section)"
    value = field.default
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return f'"{value}"' if isinstance(value, str) else f"{value:g}" if isinstance(value, float) else str(value)


def config_keys(cls: type, meanings: dict[str, str], prefix: str = "") -> list[Key]:
    """Every key `cls` accepts, sections first-level-by-level, nested sections recursed into."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    keys: list[Key] = []
    for field in dataclasses.fields(cls):
        name = prefix + field.name
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            keys.extend(config_keys(hint, meanings, prefix=f"{name}."))
            continue
        meaning = comments.get(field.name) or meanings.get(name, "")
        keys.append(Key(name, _type_name(hint), _default(field), meaning))
    return keys


def load_meanings() -> dict[str, dict[str, str]]:
    """The meanings written for keys whose field has no comment: {"run": {key: text}, "site": {...}}."""
    with MEANINGS_FILE.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def sections(cls: type) -> dict[str, str]:
    """Each nested section's name and the first paragraph of its class docstring (why the section exists)."""
    out: dict[str, str] = {}
    for field in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[field.name]
        if dataclasses.is_dataclass(hint):
            doc = hint.__doc__ or ""  # a dataclass without a docstring gets its signature: not a meaning
            doc = "" if doc.startswith(f"{hint.__name__}(") else inspect.cleandoc(doc)
            out[field.name] = doc.split("\n\n")[0].replace("\n", " ")
    return out


def _table(keys: list[Key]) -> list[str]:
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for k in keys:
        meaning = k.meaning.replace("|", "\\|")
        rows.append(f"| `{k.name}` | {k.type} | `{k.default}` | {meaning} |")
    return rows


def render(run_cls: type, site_cls: type) -> str:
    """The whole reference page in Markdown: the run config by section, then a site's own file."""
    meanings = load_meanings()
    out = [
        "# Configuration keys",
        "",
        "Generated from the config dataclasses (`fedtransfer.common.config`) every time the site builds:",
        "each key's type, default and meaning as the code has them. A key left out of a YAML file takes",
        "its default; a key the dataclasses do not know is refused before anything starts (exit 2).",
        "",
        "## The run config",
        "",
        "One YAML file given to `fedtransfer simulate --config` or `fedtransfer deploy run --config`",
        "(or the `[tool.flwr.app.config]` table of `pyproject.toml` for `flwr run .`).",
        "",
    ]
    run_keys = config_keys(run_cls, meanings["run"])
    top = [k for k in run_keys if "." not in k.name]
    out += ["### Top level", "", *_table(top), ""]
    for name, why in sections(run_cls).items():
        out += [f"### `{name}:`", ""] + ([why, ""] if why else [])
        out += [*_table([k for k in run_keys if k.name.startswith(f"{name}.")]), ""]
    out += [
        "## A site's own file",
        "",
        "Given to `fedtransfer deploy site --config` (and `fedtransfer audit --site-config`); the server",
        "never sends it and cannot change it. Relative paths in it are relative to the file.",
        "",
        *_table(config_keys(site_cls, meanings["site"])),
        "",
    ]
    return "\n".join(out)
