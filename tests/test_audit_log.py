"""Tests for the hash-chained audit log and update digests."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
from fedtransfer.common.storage.audit_log import (
    GENESIS_HASH,
    AuditLog,
    AuditLogError,
    ChainProblem,
    read_records,
    record_hash,
    update_digest,
    verify_chain,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp


def _update(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "head.weight": rng.normal(size=(3, 4)).astype(np.float32),
        "head.bias": rng.normal(size=3).astype(np.float32),
    }


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    path = tmp_path / "site.audit.jsonl"
    log = AuditLog(path)
    for round_ in range(1, 6):
        log.append("update_sent", round=round_, update=update_digest(_update(round_)))
    return path


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("".join(lines), encoding="utf-8")


def _problem_lines(path: Path) -> set[int]:
    return {problem.line for problem in verify_chain(path)}


def test_records_are_chained_and_read_back(log_path):
    records = read_records(log_path)
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["prev"] == GENESIS_HASH
    for before, after in itertools.pairwise(records):
        assert after["prev"] == before["hash"]
    for record in records:
        assert record["hash"] == record_hash(record)
        assert record["event"] == "update_sent"
        assert record["time"].endswith("+00:00")
    assert verify_chain(log_path) == []


def test_append_returns_what_is_stored(tmp_path):
    path = tmp_path / "log.jsonl"
    returned = AuditLog(path).append("round_end", pair=(1, 2), by_client={10: "a", 9: "b"}, note="ünïcode ✓")
    assert read_records(path) == [returned]
    assert returned["pair"] == [1, 2] and returned["by_client"] == {"10": "a", "9": "b"}
    assert "ünïcode ✓" in path.read_text(encoding="utf-8")  # ensure_ascii=False
    assert verify_chain(path) == []


def test_one_line_per_append(log_path):
    data = log_path.read_bytes()
    assert data.endswith(b"\n") and data.count(b"\n") == 5


def test_edited_line_detected_and_named(log_path):
    lines = _lines(log_path)
    record = json.loads(lines[2])
    record["round"] = 99  # hash left as it was
    lines[2] = json.dumps(record) + "\n"
    _write(log_path, lines)
    problems = verify_chain(log_path)
    assert [p.line for p in problems] == [3]
    assert "hash mismatch" in problems[0].reason


def test_edited_update_hash_detected(log_path):
    lines = _lines(log_path)
    record = json.loads(lines[2])
    record["update"]["sha256"] = "f" * 64
    lines[2] = json.dumps(record) + "\n"
    _write(log_path, lines)
    assert _problem_lines(log_path) == {3}


def test_forged_update_with_recomputed_record_hash_breaks_next_link(log_path):
    lines = _lines(log_path)
    record = json.loads(lines[2])
    record["update"] = update_digest(_update(1234))  # substitute another update
    record["hash"] = record_hash(record)  # forger re-seals the record
    lines[2] = json.dumps(record) + "\n"
    _write(log_path, lines)
    problems = verify_chain(log_path)
    assert [p.line for p in problems] == [4]
    assert "prev does not match hash of line 3" in problems[0].reason


@pytest.mark.parametrize("deleted", [0, 2, 3])
def test_deleted_line_detected_and_named(log_path, deleted):
    lines = _lines(log_path)
    del lines[deleted]
    _write(log_path, lines)
    problems = verify_chain(log_path)
    assert {p.line for p in problems} == {deleted + 1}  # the line now in its place
    assert any("seq" in p.reason for p in problems)
    assert any("prev" in p.reason for p in problems)


def test_reordered_lines_detected_and_named(log_path):
    lines = _lines(log_path)
    lines[1], lines[2] = lines[2], lines[1]
    _write(log_path, lines)
    assert {2, 3} <= _problem_lines(log_path) <= {2, 3, 4}


def test_inserted_duplicate_line_detected(log_path):
    lines = _lines(log_path)
    lines.insert(2, lines[1])  # replay of record 2
    _write(log_path, lines)
    assert 3 in _problem_lines(log_path)


def test_invalid_json_line_detected(log_path):
    lines = _lines(log_path)
    lines[1] = lines[1][:40] + "\n"
    _write(log_path, lines)
    problems = verify_chain(log_path)
    assert [p.line for p in problems] == [2]
    assert "invalid JSON" in problems[0].reason
    with pytest.raises(AuditLogError, match=r":2: "):
        read_records(log_path)


def test_duplicate_key_and_nan_lines_rejected(log_path):
    lines = _lines(log_path)
    lines[1] = lines[1].replace('"round":2', '"round":2,"round":7')
    lines[2] = lines[2].replace('"round":3', '"round":NaN')
    _write(log_path, lines)
    reasons = {p.line: p.reason for p in verify_chain(log_path)}
    assert "duplicate key" in reasons[2] and "NaN" in reasons[3]


def test_truncated_tail_detected_and_reopen_refused(log_path):
    data = log_path.read_bytes()
    log_path.write_bytes(data[:-30])  # crash mid-way through the last record
    problems = verify_chain(log_path)
    assert {p.line for p in problems} == {5}
    assert any("truncated" in p.reason for p in problems)
    with pytest.raises(AuditLogError, match="truncated") as error:
        AuditLog(log_path)
    assert error.value.line == 5 and str(log_path) in str(error.value)
    with pytest.raises(AuditLogError):
        read_records(log_path)


def test_append_refuses_when_tail_damaged_after_open(log_path):
    log = AuditLog(log_path)
    log_path.write_bytes(log_path.read_bytes()[:-1])  # only the newline lost
    before = log_path.read_bytes()
    with pytest.raises(AuditLogError, match=":5: "):
        log.append("late")
    assert log_path.read_bytes() == before


def test_edited_tail_refused_on_open(log_path):
    lines = _lines(log_path)
    lines[-1] = lines[-1].replace('"round":5', '"round":6')
    _write(log_path, lines)
    with pytest.raises(AuditLogError, match="hash"):
        AuditLog(log_path)


def test_reopen_continues_chain(log_path):
    last = read_records(log_path)[-1]
    record = AuditLog(log_path).append("server_ack", round=5)
    assert record["seq"] == 6 and record["prev"] == last["hash"]
    assert verify_chain(log_path) == []


def test_two_handles_in_one_process_share_one_chain(tmp_path):
    path = tmp_path / "log.jsonl"
    first, second = AuditLog(path), AuditLog(path)
    for i in range(3):
        first.append("a", i=i)
        second.append("b", i=i)
    assert [r["seq"] for r in read_records(path)] == list(range(1, 7))
    assert verify_chain(path) == []


def _append_many(path: str, tag: str, count: int) -> None:
    log = AuditLog(path)
    for i in range(count):
        log.append("worker", tag=tag, i=i)


def test_concurrent_processes_do_not_interleave(tmp_path):
    path = tmp_path / "log.jsonl"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(str(path), tag, 40)) for tag in "ab"]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    records = read_records(path)
    assert [r["seq"] for r in records] == list(range(1, 81))
    assert verify_chain(path) == []


def test_failed_fsync_leaves_no_partial_record(log_path, monkeypatch):
    before = log_path.read_bytes()

    def failing_fsync(fd: int) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk on fire"):
        AuditLog(log_path).append("doomed")
    assert log_path.read_bytes() == before


def test_non_serialisable_field_rejected_naming_it(tmp_path):
    path = tmp_path / "log.jsonl"
    log = AuditLog(path)
    with pytest.raises(TypeError, match="'weights'"):
        log.append("bad", weights=np.zeros(3))
    with pytest.raises(TypeError, match="'loss'"):
        log.append("bad", loss=float("nan"))
    with pytest.raises(TypeError, match="'count'"):
        log.append("bad", count=np.int64(3))
    with pytest.raises(ValueError, match="reserved"):
        log.append("bad", prev="x")
    with pytest.raises(ValueError, match="event"):
        log.append("")
    assert path.read_bytes() == b""


def test_problem_type():
    assert ChainProblem(3, "x") == ChainProblem(line=3, reason="x")


# --- update_digest -----------------------------------------------------------


def test_digest_describes_update():
    update = _update(0)
    digest = update_digest(update)
    assert [t["name"] for t in digest["tensors"]] == ["head.bias", "head.weight"]
    assert digest["tensors"][1] == {
        "name": "head.weight",
        "dtype": "<f4",
        "shape": [3, 4],
    }
    assert digest["num_bytes"] == 4 * (3 + 12)
    assert len(digest["sha256"]) == 64
    assert json.loads(json.dumps(digest)) == digest


def test_digest_equal_for_equal_arrays_regardless_of_order_and_layout():
    update = _update(0)
    weight = np.asfortranarray(update["head.weight"])  # same values, other layout
    rebuilt = {"head.bias": update["head.bias"].copy(), "head.weight": weight}
    assert update_digest(rebuilt) == update_digest(update)
    # what the server gets after a serialisation round trip
    received = {k: np.frombuffer(v.tobytes(), v.dtype).reshape(v.shape) for k, v in update.items()}
    assert update_digest(received) == update_digest(update)


@pytest.mark.parametrize(
    "change",
    [
        lambda u: {**u, "head.bias": u["head.bias"] + np.float32(1e-6)},
        lambda u: {"head.b": u["head.bias"], "head.weight": u["head.weight"]},
        lambda u: {**u, "head.bias": u["head.bias"].astype(np.float64)},
        lambda u: {**u, "head.weight": u["head.weight"].reshape(4, 3)},
        lambda u: {**u, "head.weight": u["head.weight"].T.copy()},
        lambda u: {**u, "extra": np.zeros(0, np.float32)},
        lambda u: {"head.bias": u["head.bias"]},
        lambda u: {"head.bias": u["head.weight"], "head.weight": u["head.bias"]},
    ],
    ids=["value", "name", "dtype", "shape", "transpose", "extra", "missing", "swapped"],
)
def test_digest_changes_with_update(change):
    update = _update(0)
    assert update_digest(change(update))["sha256"] != update_digest(update)["sha256"]


def test_digest_not_fooled_by_moving_bytes_between_tensors():
    a = {"a": np.array([1, 2], np.int32), "b": np.array([3], np.int32)}
    b = {"a": np.array([1], np.int32), "b": np.array([2, 3], np.int32)}
    assert update_digest(a)["sha256"] != update_digest(b)["sha256"]


@settings(max_examples=50, deadline=None)
@given(
    array=hnp.arrays(
        dtype=st.sampled_from([np.float32, np.float64, np.int8, np.int64]),
        shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=5),
    ),
    data=st.data(),
)
def test_digest_changes_when_any_element_changes(array, data):
    index = data.draw(st.integers(0, array.size - 1))
    changed = array.copy()
    flat = changed.reshape(-1)
    flat[index] = flat[index] + 1 if np.isfinite(flat[index]) and flat[index] < 100 else 0
    assert update_digest({"w": array.copy()}) == update_digest({"w": array})
    if changed.tobytes() != array.tobytes():
        assert update_digest({"w": changed}) != update_digest({"w": array})


@pytest.mark.parametrize(
    "bad",
    [
        {"w": [1.0, 2.0]},
        {"w": np.array([object()])},
        {1: np.zeros(2)},
        {"w": np.zeros(2, dtype=[("x", "f4"), ("y", "f4")])},
    ],
)
def test_digest_rejects_ambiguous_inputs(bad):
    with pytest.raises(TypeError):
        update_digest(bad)
