"""A Grid that hands each message to the site's real ClientApp in this process (tests only).

The ServerApp's round loop talks to the sites only through its Grid (`get_nodes`, `push_messages`,
`pull_messages`, and through them SecAgg+'s `send_and_receive`). A test about what the server does
with the replies (screening, robust aggregation, outcome lines, status.json, per-site ε, resume)
needs no SuperLink, SuperNode or Ray for that: this Grid calls `fedtransfer.client.client_app.app`
(its mods, SecAgg+'s included, and `handlers.handle`) with each node's own Context, as Flower's
Simulation Engine does, and keeps the replies until they are pulled. Seconds where a run on
real Flower processes takes a minute of start-up; the real end to end runs stay in the slow tests.

Both ways a message is serialised and parsed back (Flower's own protobuf serde) as on the wire,
so nothing one side does to its copy reaches the other. A site's ClientApp that raises becomes
Flower's error reply (`CLIENT_APP_RAISED_EXCEPTION`); an answer of None is a node that never
replies (a dropout).

`run_in_process(cfg)` runs the ServerApp's `main` on this Grid with one node per site, the node
configs `fedtransfer simulate` gives (`partition-id`, `num-partitions`), and a fresh site cache, as
a new simulation's ClientApp processes would have. Tests that call it use the `app_process_umask`
fixture (tests/conftest.py): the apps tighten their process's umask.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from fedtransfer.client import client_app
from fedtransfer.client.site import PROCESS_CACHE
from fedtransfer.common.config.run import RunConfig, to_run_config
from fedtransfer.server.federation import server_app
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

Answer = Callable[[Message, Context], Message | None]  # a node's ClientApp; None: it never replies
RUN_ID = 4242
FIRST_NODE = 101  # node ids as a SuperLink hands them out: never 0, the SuperLink's own


def _wire(message: Message) -> Message:
    """The message as the other side receives it: serialised and parsed back."""
    return message_from_proto(message_to_proto(message))


def client_error(message: Message, err: Exception) -> Message:
    """Flower's reply for a ClientApp that raised (flwr/supernode/runtime/run_clientapp.py), same code and reason."""
    reason = str(type(err)) + ":<'" + str(err) + "'>"
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)


class InProcessGrid(Grid):
    """Nodes whose ClientApps answer in this process, each with its own Context kept across messages."""

    def __init__(self, run_config: Mapping[str, Any], node_configs: list[dict[str, Any]]) -> None:
        self._run = Run.create_empty(RUN_ID)
        self.contexts = {
            FIRST_NODE + i: Context(
                run_id=RUN_ID,
                node_id=FIRST_NODE + i,
                node_config=dict(node),
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i, node in enumerate(node_configs)
        }
        # per node: what answers its messages; a test swaps one in for a hostile, failing or silent site
        self.answers: dict[int, Answer] = {node: client_app.app for node in self.contexts}
        self.offline: set[int] = set()  # nodes not connected: not listed by get_nodes
        self.pushed: list[Message] = []  # every message the server sent, as it sent them
        self._replies: dict[str, Message] = {}

    @classmethod
    def for_simulation(cls, cfg: RunConfig) -> InProcessGrid:
        """One node per configured site, with the node configs `fedtransfer simulate` gives them."""
        sites = cfg.data.num_sites
        return cls(to_run_config(cfg), [{"partition-id": i, "num-partitions": sites} for i in range(sites)])

    def node(self, partition: int) -> int:
        """The node id of the site at `partition` (its index in node_configs)."""
        return FIRST_NODE + partition

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return [n for n in self.contexts if n not in self.offline]

    def get_nodes(self) -> Iterator[NodeInfo]:
        return (NodeInfo(node_id=n) for n in self.get_node_ids())

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Deliver each message to its node's ClientApp now; the reply waits for `pull_messages`."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what the SuperLink does on a push
            self.pushed.append(msg)
            ids.append(msg.metadata.message_id)
            node = msg.metadata.dst_node_id
            if node in self.offline or node not in self.contexts:
                continue
            received = _wire(msg)
            try:
                reply = self.answers[node](received, self.contexts[node])
            except Exception as err:  # what Flower does with a ClientApp that raised
                reply = client_error(received, err)
            if reply is not None:
                reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
                self._replies[msg.metadata.message_id] = _wire(reply)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))


@contextmanager
def fresh_site_cache() -> Iterator[None]:
    """An empty PROCESS_CACHE for the block, then the one before: as a new simulation's ClientApp processes.

    Sites built in one test would otherwise stay in the worker's cache (keyed by the run's folders, so
    never served to another test, only held: a simulated site keeps its features and its split).
    """
    entries, size = PROCESS_CACHE._entries, PROCESS_CACHE._bytes  # swapped whole, restored after
    PROCESS_CACHE._entries, PROCESS_CACHE._bytes = OrderedDict(), 0
    try:
        yield
    finally:
        PROCESS_CACHE._entries, PROCESS_CACHE._bytes = entries, size


@contextmanager
def _serverapp_identity() -> Iterator[None]:
    """Flower's task identity of a ServerApp process (its messages' run and sender), then as it was."""
    before = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = before


def run_in_process(cfg: RunConfig, grid: InProcessGrid | None = None) -> dict[str, Any]:
    """Run `cfg` through the ServerApp's main on `grid` (default: one in-process node per site); status.json.

    The ServerApp reads the same flattened run config `flwr run` hands it (`to_run_config`); its
    user errors end as a failed status.json there too.
    """
    grid = grid or InProcessGrid.for_simulation(cfg)
    context = Context(
        run_id=RUN_ID, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(), run_config=to_run_config(cfg)
    )
    started = time.time()
    with fresh_site_cache(), _serverapp_identity():
        server_app.main(grid, context)
    status = cfg.output_path / "status.json"
    assert status.stat().st_mtime >= started - 1.0, f"the ServerApp wrote no status.json in {cfg.output_path}"
    return json.loads(status.read_text(encoding="utf-8"))
