"""A site's worker answers what its ClientApp forwards exactly as the ClientApp would itself, refusals included.

The worker runs on a thread of this process (the ClientApp side is this process too, or a fresh
interpreter where the test is about what that process imports). Sites are simulated partitions
of digits: the worker serves whatever context a ClientApp forwards, deployed or not.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fedtransfer.client import client_app, handlers, site_worker, train_round
from fedtransfer.client.worker_link import OP_MESSAGE, LinkBroken, Request, WorkerFailed, ask, code_digest
from fedtransfer.common.config.run import BackboneConfig, config_from_dict, to_run_config
from fedtransfer.common.encoders.image import ImageBackbone, load_backbone
from fedtransfer.common.encoders.process_cache import ProcessCache
from fedtransfer.common.model.head import make_head
from fedtransfer.common.wire.exchange import arrays_to_numpy, head_to_arrays
from fedtransfer.common.wire.protocol import RECORD_COUNTS, Refusal
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.serde import context_to_proto, message_to_proto

from tests.messages import to_site

APP_ROOT = Path(__file__).resolve().parent.parent
WORKER_ANSWERED = "site worker answered a train message"


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Path]:
    """A worker listening in tmp_path/state/worker/, on a thread; stopped after the test."""
    path = site_worker.socket_path(tmp_path / "state")
    stop = threading.Event()
    thread = threading.Thread(target=site_worker.serve, args=(path, lambda: not stop.is_set()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not path.exists():
        assert thread.is_alive() and time.monotonic() < deadline, "the worker never listened"
        time.sleep(0.05)
    yield path
    stop.set()
    thread.join(timeout=30)


def _context(root: Path, worker: Path | None = None) -> Context:
    cfg = config_from_dict(
        {
            "output_dir": str(root / "run"),
            "cache_dir": str(root.parent / "cache"),
            "device": "cpu",
            "backbone": {"image_size": 32},
            "data": {"source": "digits", "num_sites": 2, "max_samples": 300},
            "train": {"rounds": 2, "local_epochs": 1, "protocol": "fedavg"},
            "privacy": {"target_delta": 1e-4, "feature_stats": False},
        }
    )
    node = {"partition-id": 0, "num-partitions": 2} | ({"site-worker": str(worker)} if worker else {})
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=to_run_config(cfg))


@functools.cache
def _backbone() -> ImageBackbone:
    return load_backbone(BackboneConfig(image_size=32), "cpu")


def _request(fingerprint: str | None = None, kind: str = "train") -> Message:
    backbone = _backbone()
    torch.manual_seed(0)
    arrays = {k: torch.from_numpy(v) for k, v in arrays_to_numpy(head_to_arrays(make_head(1280, 10, 0))).items()}
    config = ConfigRecord(
        {
            "run-id": "0123abcd",
            "backbone-fingerprint": fingerprint or backbone.fingerprint,
            "app-version": "0.1.0",
            # round 0's record-count release: under DP a site trains only after it (client/dp_count.py), and the
            # release goes through the worker as any round does
            "server-round": 0,
            "release": RECORD_COUNTS,
        }
    )
    content = RecordDict({"arrays": ArrayRecord(arrays), "config": config})
    return to_site(content, message_type=kind, message_id="m-1", src_node_id=1, dst_node_id=7, ttl=3600.0)


def _arrays(reply: Message) -> dict[str, bytes]:
    assert not reply.has_error(), reply.error
    return {k: a.data for k, a in reply.content["arrays"].items()}


@pytest.mark.usefixtures("app_process_umask")  # it calls the ClientApp in this process
def test_a_forwarded_round_is_the_round_the_clientapp_would_train(
    worker: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    via_worker = client_app.train(_request(), _context(tmp_path / "a", worker))
    assert WORKER_ANSWERED in capsys.readouterr().out  # the worker ran it, not this process
    in_process = client_app.train(_request(), _context(tmp_path / "b"))
    assert _arrays(via_worker) == _arrays(in_process)  # same handler, same seeds: the same bytes
    timed = {k: v for k, v in via_worker.content["metrics"].items() if k != "train-seconds"}
    assert timed == {k: v for k, v in in_process.content["metrics"].items() if k != "train-seconds"}
    assert via_worker.metadata.reply_to_message_id == "m-1"  # a reply to the message it was sent
    ledger = tmp_path / "a" / "run" / "sites" / "site-0" / "privacy-ledger.json"
    charged = json.loads(ledger.read_text())["runs"]["0123abcd"]["rounds"][0]
    assert (charged["round"], charged["release"]) == (0, RECORD_COUNTS)  # the worker charged it
    assert stat.S_IMODE(worker.stat().st_mode) == 0o600 and stat.S_IMODE(worker.parent.stat().st_mode) == 0o700


@pytest.mark.usefixtures("app_process_umask")  # it calls the ClientApp in this process
def test_a_refusal_comes_back_as_the_same_flower_error(
    worker: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    via_worker = client_app.train(_request(fingerprint="0" * 64), _context(tmp_path / "a", worker))
    assert WORKER_ANSWERED in capsys.readouterr().out
    in_process = client_app.train(_request(fingerprint="0" * 64), _context(tmp_path / "b"))
    assert via_worker.has_error() and in_process.has_error()
    assert (via_worker.error.code, via_worker.error.reason) == (in_process.error.code, in_process.error.reason)
    refusal = Refusal.from_error(via_worker.error)
    assert refusal is not None and refusal.site == "site-0" and "fingerprint" in refusal.reason


def test_a_bug_in_the_worker_is_raised_and_other_code_is_not_answered(worker: Path, tmp_path: Path) -> None:
    with pytest.raises(WorkerFailed, match="ValueError: a fedtransfer site answers train and evaluate messages"):
        ask(worker, Request(OP_MESSAGE, code_digest(), _request(kind="query"), _context(tmp_path)))
    with pytest.raises(LinkBroken, match="other fedtransfer code than this ClientApp"):
        ask(worker, Request(OP_MESSAGE, "0" * 64, _request(), _context(tmp_path)))


def _hang_up_after_the_request(path: Path) -> threading.Thread:
    """A worker that dies mid-message: it takes the request and closes the connection without an answer."""
    server = site_worker.listen(path)

    def once() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                conn.recv(1 << 16)

    thread = threading.Thread(target=once, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("worker_state", ["missing", "dies mid-message"])
@pytest.mark.usefixtures("app_process_umask")  # it calls the ClientApp in this process
def test_without_an_answer_the_clientapp_answers_itself_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, worker_state: str
) -> None:
    path = site_worker.socket_path(tmp_path / "state")
    hung = _hang_up_after_the_request(path) if worker_state != "missing" else None
    logging.getLogger("flwr").addHandler(caplog.handler)
    try:
        reply = client_app.train(_request(), _context(tmp_path, path))
    finally:
        logging.getLogger("flwr").removeHandler(caplog.handler)
    assert _arrays(reply) == _arrays(client_app.train(_request(), _context(tmp_path / "b")))
    assert f"site worker {path} gave no answer" in caplog.text and "answers the message itself" in caplog.text
    if hung is not None:
        hung.join(timeout=10)


_FORWARDER = """\
import json, sys
from pathlib import Path
from flwr.common.serde import context_from_proto, message_from_proto
from flwr.proto.message_pb2 import Context, Message
from fedtransfer.client import client_app
msg = message_from_proto(Message.FromString(Path(sys.argv[1]).read_bytes()))
context = context_from_proto(Context.FromString(Path(sys.argv[2]).read_bytes()))
reply = client_app.train(msg, context)
print(json.dumps({"torch": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "opacus", "scipy")),
                  "error": reply.error.reason if reply.has_error() else None, "records": sorted(reply.content.keys())}))
"""


def test_a_clientapp_process_that_forwards_imports_no_torch(worker: Path, tmp_path: Path) -> None:
    (tmp_path / "message.pb").write_bytes(message_to_proto(_request()).SerializeToString())
    (tmp_path / "context.pb").write_bytes(context_to_proto(_context(tmp_path, worker)).SerializeToString())
    argv = [sys.executable, "-c", _FORWARDER, str(tmp_path / "message.pb"), str(tmp_path / "context.pb")]
    done = subprocess.run(argv, cwd=APP_ROOT, capture_output=True, text=True, timeout=300, check=True)
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer == {"torch": [], "error": None, "records": ["arrays", "dp", "metrics", "site"]}, done.stderr


def test_a_malformed_request_is_dropped_and_the_worker_goes_on(worker: Path, tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(worker))
        sock.sendall(b"\0" * 7 + b"\2" + b"[]")  # a header frame that is not a JSON object
        assert sock.recv(1) == b""  # closed without an answer
    with pytest.raises(WorkerFailed, match="not 'query'"):  # the next request is answered
        ask(worker, Request(OP_MESSAGE, code_digest(), _request(kind="query"), _context(tmp_path)))


_PARENT = """\
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-m", "cli", "deploy", "worker", sys.argv[1]])
print(worker.pid, flush=True)
time.sleep(600)
"""


def test_the_worker_ends_when_its_parent_is_killed(tmp_path: Path) -> None:
    """`deploy site` killed outright (SIGKILL reaches only it): its worker notices and ends on its own."""
    path = site_worker.socket_path(tmp_path / "state")
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, str(path)], cwd=APP_ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        worker_pid = int(parent.stdout.readline())
        deadline = time.monotonic() + 120
        while not path.exists():
            assert time.monotonic() < deadline, "the worker never listened"
            time.sleep(0.1)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    try:
        while _state(worker_pid) != "Z":
            assert time.monotonic() < deadline, "the worker outlived its parent"
            time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker_pid, signal.SIGKILL)  # only if the assertion failed: leave nothing behind


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_a_head_is_trained_on_one_thread_and_the_worker_keeps_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Head work on cached features runs on HEAD_THREADS; fine-tuning keeps the process's count."""
    seen: list[int] = []

    def trains(site: object, cfg: object, msg: Message) -> RecordDict:
        seen.append(torch.get_num_threads())
        return RecordDict()

    monkeypatch.setattr(train_round, "train", trains)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        reply = handlers.handle(_request(), _context(tmp_path), ProcessCache(max_entries=16, max_bytes=1 << 30))
        assert not reply.has_error(), reply.error
        assert seen == [handlers.HEAD_THREADS] and torch.get_num_threads() == 2  # restored for the next message
    finally:
        torch.set_num_threads(before)
    finetune = config_from_dict(
        {
            "finetune": {"train": "blocks", "blocks": 1},
            "train": {"protocol": "fedavg"},
            "privacy": {"feature_stats": False},
        }
    )
    assert handlers.work_threads(finetune) is None and handlers.work_threads(config_from_dict({})) == 1
