"""The ClientApp's line to its site's worker: one request, one answer, over a Unix socket.

Flower 1.41 starts a new ClientApp process for every message, and importing torch and Opacus
costs that process seconds. A deployed site can run a worker (`client/site_worker.py`) that has
imported them once; the ClientApp then forwards the message and its context to the worker and
returns the worker's answer, and imports no torch. This module is that forwarding, both ends'
framing, and nothing heavy: the standard library and Flower's own protobuf serialisation.

Wire format (both directions): length-prefixed frames (8-byte big-endian length, then the
bytes). A request is a JSON header (`op`, the sender's `code` digest), the Message and the
Context as Flower's protobufs, and for `op` "masked-sent" the masked reply's RecordDict. An
answer is a JSON header (`kind`, `detail`) and, for "content" or "error", the reply's RecordDict
or Error protobuf. Nothing from the socket is unpickled or evaluated. Only the site's own user
can reach the socket (folder 0700, socket 0600, and the worker checks the peer's uid).

The worker answers only a ClientApp whose code is byte for byte its own (`code_digest`): the
FAB the coordinator submitted runs in the ClientApp process, the worker runs the site's
installed fedtransfer, and a message must be answered by the code of the run's app version.
"""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import sys
from dataclasses import dataclass
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from logging import WARNING
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.logger import log
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.common.serde_utils import error_from_proto, error_to_proto
from flwr.proto.error_pb2 import Error as ProtoError
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from google.protobuf.message import DecodeError

NODE_CONFIG_KEY = "site-worker"  # node config: the worker's socket; absent: the ClientApp answers itself
OP_MESSAGE, OP_MASKED_SENT = "message", "masked-sent"
CONTENT, ERROR, DONE, FAILED, OTHER_CODE = "content", "error", "done", "failed", "other-code"
MAX_FRAME = 1 << 31  # a reply is a head or a model's top; 2 GiB is a malformed length, not a message
_PACKAGES = ("flwr", "numpy", "torch", "torchvision", "opacus")
_ROOT = Path(__file__).resolve().parent.parent


class WorkerFailed(RuntimeError):
    """The worker ran the message and the handler raised: a bug at the site, reported as Flower reports one."""


class LinkBroken(OSError):
    """The worker gave no answer: it is not running, or it ended mid-message."""


@dataclass(frozen=True)
class Request:
    op: str
    code: str
    message: Message
    context: Context
    masked: RecordDict | None = None  # "masked-sent": the reply secaggplus_mod made of our head
    replayed: bool = False  # "masked-sent": whether that head was re-sent from the reply cache


@cache
def code_digest() -> str:
    """SHA-256 of this fedtransfer's client/ and common/ sources, Python's and the key packages' versions."""
    h = hashlib.sha256(f"{sys.version_info[:3]}".encode())
    for name in _PACKAGES:
        try:
            h.update(f"|{name}={version(name)}".encode())
        except PackageNotFoundError:
            h.update(f"|{name}=-".encode())
    for path in sorted([*(_ROOT / "client").glob("*.py"), *(_ROOT / "common").rglob("*.py")]):
        rel = path.relative_to(_ROOT).as_posix().encode()
        data = path.read_bytes()
        h.update(len(rel).to_bytes(8, "big") + rel + len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


def send_frames(sock: socket.socket, *frames: bytes) -> None:
    sock.sendall(b"".join(struct.pack(">Q", len(f)) + f for f in frames))


def recv_frame(sock: socket.socket) -> bytes:
    """One frame; LinkBroken when the peer closed the connection before all of it arrived."""
    (length,) = struct.unpack(">Q", _recv_exactly(sock, 8))
    if length > MAX_FRAME:
        raise LinkBroken(f"a frame of {length} bytes; the peer does not speak this protocol")
    return _recv_exactly(sock, length)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise LinkBroken("the connection closed mid-message")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _header(raw: bytes) -> dict[str, str]:
    value = json.loads(raw)
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError("a frame header must be a JSON object of strings")
    return value


def send_request(sock: socket.socket, request: Request) -> None:
    header = {"op": request.op, "code": request.code, "replayed": "yes" if request.replayed else "no"}
    frames = [
        json.dumps(header).encode(),
        message_to_proto(request.message).SerializeToString(),
        context_to_proto(request.context).SerializeToString(),
    ]
    if request.masked is not None:
        frames.append(recorddict_to_proto(request.masked).SerializeToString())
    send_frames(sock, *frames)


def recv_request(sock: socket.socket) -> Request:
    """The request on `sock`; ValueError or DecodeError when it is malformed."""
    head = _header(recv_frame(sock))
    message = message_from_proto(ProtoMessage.FromString(recv_frame(sock)))
    context = context_from_proto(ProtoContext.FromString(recv_frame(sock)))
    masked = None
    if head.get("op") == OP_MASKED_SENT:
        masked = recorddict_from_proto(ProtoRecordDict.FromString(recv_frame(sock)))
    elif head.get("op") != OP_MESSAGE:
        raise ValueError(f"unknown op {head.get('op')!r}")
    return Request(head["op"], head.get("code", ""), message, context, masked, head.get("replayed") == "yes")


def send_answer(sock: socket.socket, kind: str, detail: str = "", payload: RecordDict | Error | None = None) -> None:
    frames = [json.dumps({"kind": kind, "detail": detail}).encode()]
    if isinstance(payload, RecordDict):
        frames.append(recorddict_to_proto(payload).SerializeToString())
    elif payload is not None:
        frames.append(error_to_proto(payload).SerializeToString())
    send_frames(sock, *frames)


def ask(path: Path, request: Request) -> RecordDict | Error | None:
    """The worker's answer to `request`: a reply's content or error, None for a "masked-sent" record.

    LinkBroken when the worker did not answer (not running, ended mid-message) or runs other
    code than this ClientApp (`OTHER_CODE`): the caller answers the message itself. WorkerFailed
    when the handler raised in the worker.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        send_request(sock, request)
        head = _header(recv_frame(sock))
        kind = head.get("kind")
        if kind == CONTENT:
            return recorddict_from_proto(ProtoRecordDict.FromString(recv_frame(sock)))
        if kind == ERROR:
            return error_from_proto(ProtoError.FromString(recv_frame(sock)))
        if kind == DONE:
            return None
        if kind == FAILED:
            raise WorkerFailed(f"site worker: {head.get('detail', '')}")
        raise LinkBroken(head.get("detail") or f"the worker answered {kind!r}")


def forward(msg: Message, context: Context) -> Message | None:
    """The worker's reply to `msg`, or None (with a warning) when the ClientApp must answer it itself."""
    path = _socket_of(context)
    if path is None:
        return None
    try:
        answer = ask(path, Request(OP_MESSAGE, code_digest(), msg, context))
    except (OSError, ValueError, DecodeError) as err:
        _warn(path, err)
        return None
    return Message(answer, reply_to=msg)  # type: ignore[arg-type]  # a "message" op always has content or error


def forward_masked(msg: Message, context: Context, masked: RecordDict, replayed: bool) -> bool:
    """Have the worker log the masked vectors as sent; False (with a warning) when the ClientApp must."""
    path = _socket_of(context)
    if path is None:
        return False
    try:
        ask(path, Request(OP_MASKED_SENT, code_digest(), msg, context, masked, replayed))
    except (OSError, ValueError, DecodeError) as err:
        _warn(path, err)
        return False
    return True


def _socket_of(context: Context) -> Path | None:
    value = context.node_config.get(NODE_CONFIG_KEY)
    return Path(str(value)) if value else None


def _warn(path: Path, err: Exception) -> None:
    log(
        WARNING,
        "fedtransfer: site worker %s gave no answer (%s); this ClientApp process answers the message "
        "itself (importing torch: slower, same result)",
        path,
        err,
    )
