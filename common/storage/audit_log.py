"""Append-only, hash-chained JSON Lines audit log kept by every site and the server.

Each record stores the SHA-256 of its predecessor, so editing, deleting or
reordering a line breaks the chain at a point `verify_chain` can name. The hash
is unkeyed: it makes tampering *evident*, not impossible. Whoever can rewrite the
whole file can rebuild the whole chain, and dropping the newest lines leaves a
valid (shorter) chain. The defence is cross-logging: a site and the server both
record `update_digest` of each update, so one party's log can be checked against
the other's, record by record.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from fedtransfer.common.errors import InputError

GENESIS_HASH = "0" * 64
RESERVED_FIELDS = frozenset({"seq", "time", "event", "prev", "hash"})
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TAIL_CHUNK = 4096
_DIGEST_TAG = b"fedtransfer-update-digest-v1"


class AuditLogError(InputError):
    """The log file is malformed; raised instead of extending a broken chain."""

    def __init__(self, path: str | os.PathLike[str], line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}")
        self.path = Path(path)
        self.line = line
        self.reason = reason


@dataclass(frozen=True)
class ChainProblem:
    """One defect found by `verify_chain`; `line` is 1-based, as in editors."""

    line: int
    reason: str


def record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of `record` without its "hash" field.

    Canonical (sorted keys, no whitespace) so that writer and verifier hash the
    same bytes whatever key order or spacing the line happens to have.
    """
    body = {key: value for key, value in record.items() if key != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class AuditLog:
    """Appender for one audit log file.

    Nothing is cached between appends: each `append` takes an exclusive `flock`,
    re-reads the last record and links to it, so several `AuditLog` objects or
    processes on one file still produce a single linear chain. (`flock` is
    advisory and unreliable on network file systems; keep logs on local disk.)
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Open (creating if absent) the log at `path`.

        Raises `AuditLogError` if the last line is partial or invalid, so a
        damaged log is noticed when it is opened rather than silently extended.
        """
        self.path = Path(path)
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            self._last_record(fd)
        finally:
            os.close(fd)  # also releases the lock

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Durably append one record and return it exactly as it was stored.

        Field values are normalised through JSON (tuples become lists, non-string
        keys become strings) so the returned record equals what `read_records`
        gives back, and its hash verifies. The line goes out in a single `write`
        on an unbuffered descriptor, then `fsync`; if either fails the file is cut
        back to its previous length so no partial record is left behind.
        """
        if not isinstance(event, str) or not event:
            raise ValueError("event must be a non-empty string")
        reserved = RESERVED_FIELDS.intersection(fields)
        if reserved:
            raise ValueError(f"field names {sorted(reserved)} are reserved for the chain")
        normalised = {name: _json_normalise(name, value) for name, value in fields.items()}

        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            last = self._last_record(fd)
            record: dict[str, Any] = {
                "seq": 1 if last is None else last["seq"] + 1,
                "time": datetime.now(UTC).isoformat(timespec="microseconds"),
                "event": event,
                **normalised,
                "prev": GENESIS_HASH if last is None else last["hash"],
            }
            record["hash"] = record_hash(record)
            line = json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n"
            data = line.encode("utf-8")
            size = os.fstat(fd).st_size
            try:
                if os.write(fd, data) != len(data):
                    raise OSError(f"short write to {self.path}")
                os.fsync(fd)
            except BaseException:
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
        return record

    def _open(self) -> int:
        return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)

    def _last_record(self, fd: int) -> dict[str, Any] | None:
        """Parse and check the last line, reading backwards so appends stay O(1)."""
        size = os.fstat(fd).st_size
        if size == 0:
            return None
        complete = os.pread(fd, 1, size - 1) == b"\n"
        end = size - 1 if complete else size
        start = end
        while start > 0:
            chunk_start = max(0, start - _TAIL_CHUNK)
            newline = os.pread(fd, start - chunk_start, chunk_start).rfind(b"\n")
            if newline != -1:
                start = chunk_start + newline + 1
                break
            start = chunk_start
        if not complete:
            raise self._corrupt(
                fd,
                start,
                "last line is truncated (no trailing newline): a write was "
                "interrupted; repair or archive the log before appending",
            )
        try:
            record = _parse_line(os.pread(fd, end - start, start))
        except ValueError as exc:
            raise self._corrupt(fd, start, f"last record is unreadable: {exc}") from None
        if record_hash(record) != record["hash"]:
            raise self._corrupt(fd, start, "last record fails its hash check (edited?)")
        return record

    def _corrupt(self, fd: int, offset: int, reason: str) -> AuditLogError:
        """Build the error, counting newlines before `offset` to name the line."""
        newlines = 0
        for chunk_start in range(0, offset, 1 << 20):
            newlines += os.pread(fd, min(1 << 20, offset - chunk_start), chunk_start).count(b"\n")
        return AuditLogError(self.path, newlines + 1, reason)


def verify_chain(path: str | os.PathLike[str]) -> list[ChainProblem]:
    """Check every line of the log; an empty list means the chain is intact.

    Reports edited records (hash mismatch), deleted, inserted or reordered lines
    (seq / prev do not follow the previous record), unreadable lines and a
    truncated last line. After an unreadable line the next line's link is not
    checked, since what it should link to is unknown. Cannot detect removal of the
    newest lines; compare the head with another party's log for that.
    """
    problems: list[ChainProblem] = []
    expected: tuple[int, str] | None = (1, GENESIS_HASH)  # next seq and prev hash
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            if not raw.endswith(b"\n"):
                problems.append(ChainProblem(number, "truncated line (no trailing newline)"))
            try:
                record = _parse_line(raw.rstrip(b"\n"))
            except ValueError as exc:
                problems.append(ChainProblem(number, f"unreadable record: {exc}"))
                expected = None
                continue
            if record_hash(record) != record["hash"]:
                problems.append(ChainProblem(number, "hash mismatch: record was edited"))
            if expected is not None:
                seq, prev = expected
                link = "genesis" if number == 1 else f"hash of line {number - 1}"
                if record["prev"] != prev:
                    problems.append(
                        ChainProblem(
                            number,
                            f"prev does not match {link}: a line was deleted, inserted, reordered or rewritten",
                        )
                    )
                if record["seq"] != seq:
                    problems.append(
                        ChainProblem(
                            number,
                            f"seq {record['seq']} where {seq} expected: a line was deleted, inserted or reordered",
                        )
                    )
            expected = (record["seq"] + 1, record["hash"])
    return problems


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Parse all records (without verifying hashes; use `verify_chain` for that).

    Raises `AuditLogError` naming the line if any line is partial or unreadable.
    """
    records = []
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            if not raw.endswith(b"\n"):
                raise AuditLogError(path, number, "truncated line (no trailing newline)")
            try:
                records.append(_parse_line(raw.rstrip(b"\n")))
            except ValueError as exc:
                raise AuditLogError(path, number, f"unreadable record: {exc}") from None
    return records


def update_digest(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Describe a model update for the log: per-tensor name/dtype/shape, bytes, SHA-256.

    The site and the server each log this for the same update and are matched
    later, so it depends only on names, dtypes, shapes and values: not on dict
    order or memory layout. Names are hashed in sorted order; each tensor's
    header (name, dtype string, shape) and raw C-order bytes are length-prefixed
    so that no two different updates serialise to the same byte stream.
    """
    names = list(arrays)
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}")
    hasher = hashlib.sha256(_DIGEST_TAG)
    hasher.update(len(names).to_bytes(8, "big"))
    tensors = []
    num_bytes = 0
    for name in sorted(names):
        array = arrays[name]
        if not isinstance(array, np.ndarray):
            raise TypeError(f"tensor {name!r} is a {type(array).__name__}, not a numpy array")
        if array.dtype.hasobject or array.dtype.fields is not None:
            raise TypeError(f"tensor {name!r} has dtype {array.dtype}; its raw bytes do not determine its value")
        meta = {"name": name, "dtype": array.dtype.str, "shape": list(array.shape)}
        header = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
        data = array.tobytes(order="C")
        for part in (header, data):
            hasher.update(len(part).to_bytes(8, "big"))
            hasher.update(part)
        tensors.append(meta)
        num_bytes += len(data)
    return {"tensors": tensors, "num_bytes": num_bytes, "sha256": hasher.hexdigest()}


def _json_normalise(name: str, value: Any) -> Any:
    try:
        text = json.dumps(value, sort_keys=True, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"audit field {name!r} is not JSON-serialisable: {exc}") from None
    return json.loads(text)


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A line with a repeated key reads differently to different parsers; refuse it."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    """NaN and Infinity are not JSON and have no canonical form to hash."""
    raise ValueError(f"non-standard constant {name}")


def _parse_line(raw: bytes) -> dict[str, Any]:
    """Decode one line and check its chain fields; ValueError says what is wrong."""
    try:
        record = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_reject_duplicate_keys,
            parse_constant=_reject_constant,
        )
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 ({exc})") from None
    except ValueError as exc:  # JSONDecodeError, duplicate key, NaN, oversized int
        raise ValueError(f"invalid JSON ({exc})") from None
    problem = _schema_problem(record)
    if problem is not None:
        raise ValueError(problem)
    return record


def _schema_problem(record: Any) -> str | None:
    """What is wrong with the chain fields of a parsed line, if anything."""
    if not isinstance(record, dict):
        return "not a JSON object"
    seq = record.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        return "missing or invalid 'seq'"
    for key in ("time", "event"):
        if not isinstance(record.get(key), str):
            return f"missing or invalid {key!r}"
    for key in ("prev", "hash"):
        value = record.get(key)
        if not isinstance(value, str) or not _HEX64.fullmatch(value):
            return f"missing or invalid {key!r}"
    return None
