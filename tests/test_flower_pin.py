"""Flower's object pulls retry soon in fedtransfer's processes (common/wire/flower_pin.py)."""

from __future__ import annotations

import time
import types

import pytest
from fedtransfer.common.wire import flower_pin
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError, pull_objects


@pytest.fixture
def flower_defaults(monkeypatch: pytest.MonkeyPatch) -> dict:
    """pull_objects' keyword defaults, restored after the test (quick_object_pulls changes them process-wide)."""
    defaults = pull_objects.__kwdefaults__
    monkeypatch.setitem(defaults, "initial_backoff", defaults["initial_backoff"])
    return defaults


def test_flowers_pull_objects_is_the_one_pinned() -> None:
    """Fails when Flower's pull_objects changes: the quicker retry must then be redone."""
    assert flower_pin.source_digest(inflatable_utils, "pull_objects") == flower_pin.PULL_OBJECTS_SHA256
    assert flower_pin.flower_version() == flower_pin.FLOWER_VERSION


def test_an_object_not_there_yet_is_asked_again_soon(flower_defaults: dict) -> None:
    """With Flower's default the second try waits 0.8-1.2 s; after quick_object_pulls it does not."""
    assert flower_pin.quick_object_pulls() is None
    assert flower_defaults["initial_backoff"] == flower_pin.OBJECT_RETRY_S
    tries: list[float] = []

    def pull(object_id: str) -> bytes:
        tries.append(time.monotonic())
        if len(tries) == 1:
            raise ObjectUnavailableError(object_id)
        return b"content"

    assert pull_objects(["a" * 64], pull) == {"a" * 64: b"content"}
    assert len(tries) == 2 and tries[1] - tries[0] < 0.8


def test_another_flower_keeps_its_own_retry(flower_defaults: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    before = flower_defaults["initial_backoff"]
    monkeypatch.setattr(flower_pin, "flower_version", lambda: "1.42.0")
    assert flower_pin.quick_object_pulls() == "flwr 1.42.0 is installed; quicker object pulls are for flwr 1.41.0 only"
    monkeypatch.undo()
    changed = types.ModuleType("inflatable_utils")
    changed.__file__ = "/elsewhere/inflatable_utils.py"
    exec("def pull_objects(ids, fn, *, initial_backoff=1):\n    return {}\n", changed.__dict__)
    monkeypatch.setattr(flower_pin, "source_digest", lambda module, name: "0" * 64)
    assert flower_pin.quick_object_pulls(changed) == (
        "/elsewhere/inflatable_utils.py: pull_objects differs from flwr 1.41.0's"
    )
    assert flower_defaults["initial_backoff"] == before and changed.pull_objects.__kwdefaults__["initial_backoff"] == 1
