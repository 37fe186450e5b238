"""A deployed site's worker: torch and Opacus imported once, messages answered one at a time.

Flower 1.41 starts a ClientApp process for every message, and most of that process's life
went to importing torch and Opacus (seconds, twice a round at every site). `fedtransfer
deploy site` starts this worker next to the SuperNode, for the SuperNode's life; each
ClientApp forwards its message here (client/worker_link.py) and imports no torch itself.

What the worker keeps is imported code, not the site: every message builds the site afresh,
exactly as a new ClientApp process would (site YAML and policy read again, data files hashed
again, weights files hashed again once their stat changes, prepared records checked again:
client/prepared.py), and runs the same `fedtransfer.client.handlers.handle` (head work on one torch
thread: `handlers.work_threads`). So an edited policy applies at the next message, and a record
still skips work, never a check. Messages are answered one at a time, each under the state
folder's `.message.lock`, as before.

The socket lives in `state_dir/worker/` (folder 0700, socket 0600) and the worker answers only
peers of its own uid, and only a ClientApp running byte-identical code (`code_digest`); any
other ClientApp answers its message itself. The worker ends when its parent (`deploy site`)
does, or on SIGTERM with the SuperNode's process group.

    fedtransfer deploy worker SOCKET   (deploy site starts it)
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from fedtransfer.client.worker_link import (
    CONTENT,
    DONE,
    ERROR,
    FAILED,
    OP_MASKED_SENT,
    OTHER_CODE,
    LinkBroken,
    code_digest,
    recv_request,
    send_answer,
)
from flwr.app import Error, RecordDict
from google.protobuf.message import DecodeError

if TYPE_CHECKING:
    from fedtransfer.common.encoders.process_cache import ProcessCache  # imports torch: only the worker's serve() does

SOCKET_NAME = "worker/site.sock"  # under the site's state_dir
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes on Linux, with the terminating NUL
_POLL_S = 1.0  # how soon the worker notices that its parent is gone


class WorkerError(RuntimeError):
    """The worker cannot listen where it was asked to (path too long, folder not the site user's)."""


def socket_path(state_dir: Path) -> Path:
    """Where a site's worker listens; WorkerError when the path is too long for a Unix socket."""
    path = state_dir.resolve() / SOCKET_NAME
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise WorkerError(
            f"{path}: {len(os.fsencode(path))} bytes, longer than a Unix socket path may be "
            f"({MAX_SOCKET_PATH}); a shorter state_dir lets the site run its worker"
        )
    return path


def listen(path: Path) -> socket.socket:
    """A listening socket at `path`, reachable by this user only (folder 0700, socket 0600)."""
    folder = path.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if folder.stat().st_uid != os.getuid():
        raise WorkerError(f"{folder} belongs to another user; the site worker needs a folder of its own")
    folder.chmod(0o700)
    fresh = path.with_name(path.name + ".new")
    fresh.unlink(missing_ok=True)  # left by a worker that ended; `deploy site` holds the state folder, so no live one
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous = os.umask(0o177)  # no moment in which another user could connect
    try:
        sock.bind(str(fresh))
    finally:
        os.umask(previous)
    fresh.chmod(0o600)
    sock.listen(16)
    os.replace(fresh, path)  # the socket appears at `path` only once it accepts connections
    return sock


def serve(path: Path, keep_going: Callable[[], bool]) -> None:
    """Answer requests on `path` one at a time while `keep_going()`; imports the handlers first."""
    from fedtransfer.client import handlers  # torch, Opacus, SciPy: once, before the socket says the worker is ready
    from fedtransfer.common.encoders.process_cache import ProcessCache

    own = code_digest()
    with listen(path) as server:
        server.settimeout(_POLL_S)
        print(f"fedtransfer: site worker listening on {path} (pid {os.getpid()})", flush=True)
        while keep_going():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(None)
                # a fresh cache per message: the site is built as a new process would build it
                _serve_one(conn, handlers, own, ProcessCache(max_entries=64, max_bytes=4 << 30))


def _serve_one(conn: socket.socket, handlers: ModuleType, own: str, cache: ProcessCache) -> None:
    """One request: check the peer and its code, run the handler, answer."""
    _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    if uid != os.getuid():
        return  # not the site's user: no answer at all (the socket's mode already keeps others out)
    t0 = time.monotonic()
    try:
        request = recv_request(conn)
    except (LinkBroken, ValueError, DecodeError) as err:
        print(f"fedtransfer: site worker: a malformed request ({err}); not answered", file=sys.stderr, flush=True)
        return
    if request.code != own:
        send_answer(
            conn,
            OTHER_CODE,
            "the worker runs other fedtransfer code than this ClientApp (another app "
            "version); restart the site to run this one in its worker",
        )
        return
    try:
        if request.op == OP_MASKED_SENT:
            assert request.masked is not None  # recv_request reads it for this op
            handlers.record_masked(request.message, request.context, request.masked, request.replayed, cache)
            answer: tuple[str, str, RecordDict | Error | None] = (DONE, "", None)
        else:
            reply = handlers.handle(request.message, request.context, cache)
            answer = (ERROR, "", reply.error) if reply.has_error() else (CONTENT, "", reply.content)
    except Exception as err:  # a bug, as in a ClientApp process: log the traceback, answer with its type and text
        traceback.print_exc()
        answer = (FAILED, f"{type(err).__name__}: {err}", None)
    kind = request.message.metadata.message_type
    print(
        f"fedtransfer: site worker answered a {kind} message ({request.op}) in {time.monotonic() - t0:.2f} s",
        flush=True,
    )
    send_answer(conn, *answer)


def run(sock: Path) -> int:
    """`fedtransfer deploy worker SOCKET` (started by `deploy site`): serve until the parent that started it ends."""
    parent = os.getppid()
    try:
        serve(sock, lambda: os.getppid() == parent)
    except (WorkerError, OSError) as err:
        print(f"fedtransfer: site worker: {err}", file=sys.stderr)
        return 2
    return 0
