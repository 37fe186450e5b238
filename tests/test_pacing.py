"""A site's SuperNode without Flower's fixed idle waits: pinned to flwr 1.41.0's code, paced, refused elsewhere."""

from __future__ import annotations

import inspect
import subprocess
import sys
from types import SimpleNamespace

import pytest
from fedtransfer.deploy import pacing
from fedtransfer.deploy.pacing import FlowerPinError, Pacer, Pacing
from flwr.supernode import start_client_internal


def test_the_installed_flower_is_the_code_the_pacing_rewrites() -> None:
    """Fails when Flower's SuperNode changes where its waits are: the pins (and the pacing) must then be redone."""
    assert pacing.check_flower() is start_client_internal
    source = {name: inspect.getsource(getattr(start_client_internal, name)) for name in pacing.PINNED_SOURCES}
    assert "time.sleep(3)" in source["start_client_internal"]  # the idle wait after a pull without a message
    assert source["_push_messages"].count("time.sleep(0.5)") == 2  # the reply and its objects


def test_another_flower_version_is_refused_in_one_line_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pacing, "flower_version", lambda: "1.42.0")
    with pytest.raises(FlowerPinError, match=r"flwr 1\.42\.0 is installed.*install flwr==1\.41\.0") as err:
        pacing.check_flower()
    assert "\n" not in str(err.value)


def test_changed_flower_code_is_refused_naming_the_function(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(pacing.PINNED_SOURCES, "_push_messages", "0" * 64)
    with pytest.raises(FlowerPinError, match=r"_push_messages differ"):
        pacing.check_flower()


def test_polls_are_quick_after_a_message_and_back_off_to_flowers_pause_when_idle() -> None:
    now = [0.0]
    pacer = Pacer(Pacing(fast_s=0.2, fast_for_s=30.0, growth=2.0, idle_s=3.0), clock=lambda: now[0])
    assert pacer.idle_pause() == 0.2  # just started: a run's first message is picked up quickly
    now[0] = 29.0
    assert pacer.idle_pause() == 0.2
    now[0] = 31.0
    pauses = [pacer.idle_pause() for _ in range(6)]
    assert pauses == [0.4, 0.8, 1.6, 3.0, 3.0, 3.0]  # never slower than Flower's own 3 s
    pacer.saw_message()
    assert pacer.idle_pause() == 0.2


def test_installed_pacing_replaces_only_flowers_two_fixed_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The module's sleep(3) and sleep(0.5) are paced; any other sleep and the rest of `time` are untouched."""
    module = SimpleNamespace(time=None, _pull_and_store_message=lambda got: got)
    slept: list[float] = []
    now = [100.0]
    pacer = Pacer(Pacing(fast_s=0.2, fast_for_s=30.0, growth=2.0, reply_poll_s=0.02), clock=lambda: now[0])
    pacing.install(module, pacer, sleep=slept.append)  # type: ignore[arg-type]
    now[0] = 200.0  # idle for long
    module.time.sleep(3)
    module.time.sleep(0.5)
    module.time.sleep(1.25)
    assert slept == [0.4, 0.02, 1.25]
    assert module._pull_and_store_message(None) is None  # nothing pulled: still idle
    module.time.sleep(3)
    assert module._pull_and_store_message(7) == 7  # a message: quick polls again
    module.time.sleep(3)
    assert slept[3:] == [0.8, 0.2]
    assert module.time.monotonic is pacing.time.monotonic


def test_the_paced_supernode_is_flowers_own_command() -> None:
    """`fedtransfer deploy paced-supernode flower-supernode --help` runs Flower's entry point after the pins hold."""
    argv = pacing.paced_argv(["flower-supernode", "--help"])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "SuperNode pacing: a pull every 0.2 s" in done.stdout and "--superlink" in done.stdout
    assert argv[:5] == [sys.executable, "-m", "fedtransfer.cli", "deploy", "paced-supernode"]
