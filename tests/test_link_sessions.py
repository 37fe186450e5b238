"""The SuperLink drops a half-pushed reply after 60 s, not 180 s: pinned to flwr 1.41.0's code (issue 24)."""

from __future__ import annotations

import inspect
import operator
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from fedtransfer.deploy import link_sessions
from fedtransfer.deploy.link_sessions import SESSION_TTL_S, TTL_NAME, FlowerPinError
from fedtransfer.deploy.pacing import FLOWER_VERSION
from flwr.supercore.corestate.in_memory_corestate import InMemoryCoreState
from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore


class _CoreState(InMemoryCoreState):
    """Flower's in-memory core state, its two abstract methods (not used here) filled."""

    def get_node_id(self, *args: object) -> int:
        raise AssertionError("not used")

    def store_message_and_object_tree(self, *args: object) -> None:
        raise AssertionError("not used")


def test_the_pinned_functions_are_the_only_readers_of_flowers_session_ttl() -> None:
    """Fails when Flower reads the TTL anywhere else (or elsewhere than these modules): the bound must be redone."""
    for module in link_sessions.check_flower():
        pins = link_sessions.PINNED_SOURCES[module.__name__]
        in_pinned = sum(inspect.getsource(operator.attrgetter(q)(module)).count(TTL_NAME) for q in pins)
        assert in_pinned >= len(pins)  # each pinned function reads it
        assert inspect.getsource(module).count(TTL_NAME) == in_pinned + 1  # + the import, nothing else
        assert getattr(module, TTL_NAME) == link_sessions.FLOWER_SESSION_TTL_S


def test_another_flower_version_is_refused_in_one_line_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(link_sessions, "flower_version", lambda: "1.42.0")
    with pytest.raises(FlowerPinError, match=rf"flwr 1\.42\.0 is installed.*install flwr=={FLOWER_VERSION}") as err:
        link_sessions.check_flower()
    assert "\n" not in str(err.value)


def test_changed_flower_code_is_refused_naming_the_function(monkeypatch: pytest.MonkeyPatch) -> None:
    pins = link_sessions.PINNED_SOURCES["flwr.supercore.corestate.sql_corestate"]
    monkeypatch.setitem(pins, "SqlCoreState.store_object", "0" * 64)
    with pytest.raises(FlowerPinError, match=r"sql_corestate\.py: SqlCoreState\.store_object differ"):
        link_sessions.check_flower()


def test_a_bounded_superlinks_push_session_expires_after_60_s(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's own state class, with the bound installed, gives a new push session 60 s (and a stalled one dies)."""
    modules = link_sessions.check_flower()
    for module in modules:  # the bound applies to this process; put Flower's value back afterwards
        monkeypatch.setattr(module, TTL_NAME, getattr(module, TTL_NAME))
    link_sessions.install(modules)
    state = _CoreState(InMemoryObjectStore())
    before = datetime.now(UTC)
    session_id = state.start_session(run_id=7)
    expires = state._object_push_sessions[session_id].expires_at
    assert timedelta(seconds=SESSION_TTL_S) <= expires - before < timedelta(seconds=SESSION_TTL_S + 5)
    state._object_push_sessions[session_id].pending_object_ids.add("obj")
    state._object_push_sessions[session_id].expires_at = before - timedelta(seconds=1)  # its objects stopped coming
    assert state.store_object(7, session_id, "obj", b"late") is False  # refused: the half-pushed reply is dropped


def test_the_bounded_superlink_is_flowers_own_command() -> None:
    argv = link_sessions.bounded_argv(["flower-superlink", "--help"])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert f"push sessions expire after {SESSION_TTL_S} s" in done.stdout and "--enable-supernode-auth" in done.stdout
    assert argv[:5] == [sys.executable, "-m", "fedtransfer.cli", "deploy", "bounded-superlink"]
