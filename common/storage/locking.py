"""One writer per folder: a run's output folder and a site's state folder are held while in use.

Two runs writing one output folder interleave `metrics.jsonl` and overwrite each other's
checkpoints and model; two processes updating one site's ledger could lose a round's ε.
An advisory `flock` on `<folder>/.lock` is released by the kernel when its holder exits,
however it exits, so a crash never leaves a stale lock behind. The file's text names the
holder, so a refusal can say who holds the folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".lock"


class FolderInUse(RuntimeError):
    """Another process holds the folder; the message names the folder and the holder."""


def _holder(path: Path) -> str:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {int(raw['pid'])} on {str(raw['host'])[:64]} ({str(raw['what'])[:80]}, since {raw['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def hold(folder: Path, what: str, wait_s: float = 0.0, name: str = LOCK_NAME) -> Iterator[None]:
    """Hold `folder` for the block; FolderInUse if another process holds it after `wait_s` seconds.

    `name` picks the lock file: a site's state folder has one for its SuperNode's life and
    one per message its ClientApp processes, which are the SuperNode's children.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise FolderInUse(
                        f"{folder} is in use by {_holder(path)}; wait for it to finish or use another folder"
                    ) from None
                time.sleep(0.05)
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "what": what or " ".join(sys.argv)[:200],
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def check_free(folder: Path) -> None:
    """Refuse early (before starting anything) when another process holds `folder`; holds nothing."""
    if (folder / LOCK_NAME).exists():
        with hold(folder, "a check before starting a run"):
            pass
