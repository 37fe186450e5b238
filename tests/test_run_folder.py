"""A run's folder is held by one run at a time, and a resume never rewrites a run under a different config."""

from __future__ import annotations

import json
import multiprocessing
from dataclasses import replace
from pathlib import Path

import pytest
from fedtransfer.common.config.run import ConfigError, RunConfig, config_from_dict, to_nested
from fedtransfer.common.storage import locking
from fedtransfer.server.federation import run_folder


def _hold_until_told(folder: str, ready: multiprocessing.Event, release: multiprocessing.Event) -> None:
    with locking.hold(Path(folder), "the first run"):
        ready.set()
        release.wait(30)


def test_a_second_run_into_a_held_folder_is_refused_naming_folder_and_holder(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    first = ctx.Process(target=_hold_until_told, args=(str(tmp_path), ready, release))
    first.start()
    try:
        assert ready.wait(60)
        with pytest.raises(locking.FolderInUse) as refused, locking.hold(tmp_path, "the second run"):
            pytest.fail("the second holder got in")
        message = str(refused.value)
        assert str(tmp_path) in message and f"pid {first.pid}" in message and "the first run" in message
        with pytest.raises(locking.FolderInUse):
            locking.check_free(tmp_path)
    finally:
        release.set()
        first.join(30)
    locking.check_free(tmp_path)  # the holder exited: free again, without any clean-up
    with locking.hold(tmp_path, "a later run"):
        pass


def _run_folder(tmp_path: Path, status: str | None) -> RunConfig:
    cfg = config_from_dict({"output_dir": str(tmp_path / "run"), "privacy": {"target_epsilon": 3.0}})
    cfg.output_path.mkdir(parents=True)
    (cfg.output_path / run_folder.CONFIG).write_text(json.dumps(to_nested(cfg)))
    if status is not None:
        (cfg.output_path / run_folder.STATUS).write_text(json.dumps({"status": status, "run_id": "abc"}))
    return cfg


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"privacy": {"target_epsilon": 8.0}}, "privacy.target_epsilon"),
        ({"backbone": {"name": "resnet18"}}, "backbone.name"),
        ({"data": {"num_sites": 5}}, "data.num_sites"),
        ({"train": {"rounds": 9}}, "train.rounds"),
    ],
)
def test_resume_with_a_changed_config_is_refused_before_anything_is_written(
    tmp_path: Path, change: dict, key: str
) -> None:
    cfg = _run_folder(tmp_path, status=None)
    before = _snapshot(cfg.output_path)
    changed = config_from_dict({"output_dir": cfg.output_dir, "privacy": {"target_epsilon": 3.0}} | change)
    with pytest.raises(ConfigError, match=rf"cannot resume with a changed config: {key} "):
        run_folder.check_resume(replace(changed, resume=True))
    assert _snapshot(cfg.output_path) == before


def test_resume_may_change_where_and_how_fast_it_runs(tmp_path: Path) -> None:
    cfg = _run_folder(tmp_path, status=None)
    moved = replace(cfg, resume=True, device="cpu", cache_dir=str(tmp_path / "elsewhere"))
    assert run_folder.check_resume(moved) is None


def test_resuming_a_completed_run_does_nothing(tmp_path: Path) -> None:
    cfg = _run_folder(tmp_path, status="completed")
    assert run_folder.check_resume(replace(cfg, resume=True)) == {"status": "completed", "run_id": "abc"}
    failed = _run_folder(tmp_path / "other", status="failed")
    assert run_folder.check_resume(replace(failed, resume=True)) is None
