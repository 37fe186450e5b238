"""Who each reply is from, and what each site did in a round.

A site names itself in its reply's SITE record or in its `Refusal`; a node that never did
is named by its registration (`flwr supernode register --name`) or as `node-<id>`. An
error that is not a `Refusal` (the SuperLink answering for a lapsed node, a ClientApp that
crashed) belongs to the node the message was sent to: no name is ever parsed out of an
error's text, so a reply saying "Error: Node Unavailable" is a dropout of that node.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fedtransfer.common.wire.protocol import Refusal, SiteStatus, site_of
from fedtransfer.server.federation import timing
from flwr.app import Message
from flwr.serverapp import Grid


class SiteBook:
    """Node ids to site names, and every site this run has known, in the order it met them."""

    def __init__(self, known: Iterable[str] = ()) -> None:
        self._names: dict[int, str] = {}
        self.known: list[str] = list(dict.fromkeys(known))

    def learn(self, node: int, name: str) -> str:
        self._names.setdefault(node, name)
        if name not in self.known:
            self.known.append(name)
        return self._names[node]

    def learn_registered(self, grid: Grid) -> list[int]:
        """The nodes connected now; those registered with `--name` are named even before they reply."""
        nodes = []
        for info in grid.get_nodes():
            nodes.append(info.node_id)
            if getattr(info, "name", ""):
                self.learn(info.node_id, info.name)
        return nodes

    def name(self, node: int) -> str:
        return self._names.get(node, f"node-{node}")


@dataclass(frozen=True)
class Answer:
    """One asked node's answer: a reply fit to screen, or why there is none."""

    node: int
    site: str
    status: SiteStatus | None  # None: a reply with content, to be screened and aggregated
    reason: str = ""
    reply: Message | None = None


def answers(messages: list[Message], replies: Iterable[Message], book: SiteBook, timeout: float) -> list[Answer]:
    """Every asked node's answer, each reply attributed to the node it was sent to, whoever sent it."""
    sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    by_node: dict[int, Message] = {}
    for reply in replies:
        if (node := sent_to.get(reply.metadata.reply_to_message_id)) is not None:
            by_node[node] = reply
    out = []
    for msg in messages:
        node = msg.metadata.dst_node_id
        reply = by_node.get(node)
        if reply is None:
            out.append(Answer(node, book.name(node), SiteStatus.NO_REPLY, f"no reply within {timeout:g}s"))
        else:
            out.append(answer_of(node, reply, book))
    return out


def answer_of(node: int, reply: Message, book: SiteBook) -> Answer:
    """Classify one reply from (or for) `node`."""
    if not reply.has_error():
        if (name := site_of(reply.content)) is not None:
            book.learn(node, name)
        return Answer(node, book.name(node), None, reply=reply)
    if (refusal := Refusal.from_error(reply.error)) is not None and reply.metadata.src_node_id == node:
        return Answer(node, book.learn(node, refusal.site), SiteStatus.DECLINED, refusal.reason)
    reason = reply.error.reason or f"error code {reply.error.code}"
    if reply.metadata.src_node_id != node:  # the SuperLink answered for a node whose heartbeat lapsed
        return Answer(node, book.name(node), SiteStatus.NO_REPLY, f"dropped out: {reason}")
    return Answer(node, book.name(node), SiteStatus.FAILED, f"the site's ClientApp failed: {reason}")


@dataclass
class SiteRound:
    """What one site did in one round, as metrics.jsonl and privacy.json record it."""

    status: SiteStatus
    reason: str = ""
    fields: dict[str, Any] = field(default_factory=dict)  # trained: examples, steps, ε and the DP parameters

    def as_record(self, rnd: int | None = None) -> dict[str, Any]:
        """privacy.json's per-round form (with the round), or metrics.jsonl's (without)."""
        out: dict[str, Any] = {} if rnd is None else {"round": rnd}
        out["status"] = str(self.status)
        if self.reason:
            out["reason"] = self.reason
        return out | self.fields


def absent_sites(book: SiteBook, asked: Iterable[str], connected: Iterable[str]) -> dict[str, SiteRound]:
    """Sites the run knows that were not asked this round: offline, or connected but not sampled."""
    asked, connected = set(asked), set(connected)
    return {
        name: SiteRound(SiteStatus.NOT_SELECTED, "not sampled this round")
        if name in connected
        else SiteRound(SiteStatus.OFFLINE, "not connected when the round started")
        for name in book.known
        if name not in asked
    }


# polling for replies: quick at first, then every 0.25 s (a reply waited up to 1 s for the pull at 1.0 s)
FIRST_PULL_S, MAX_PULL_S = 0.05, 0.25


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
    """Push `messages` and pull their replies until all came back or `timeout` passed.

    Flower 1.41's `Grid.send_and_receive` over HTTP sleeps a fixed 3 s between pulls, so every
    exchange of a deployed round waited for the next multiple of 3 s. Polling soon and then
    less and less often returns as soon as the last reply is in, for the price of a few small
    requests to the SuperLink.
    """
    messages = list(messages)
    kind = messages[0].metadata.message_type if messages else ""
    ids, exchange = timing.pushed(grid.push_messages, messages, kind)  # when each reply came: timing.py
    sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    pending = set(ids)
    replies: list[Message] = []
    deadline, pause = time.monotonic() + timeout, FIRST_PULL_S
    while pending:
        got = list(grid.pull_messages(pending))
        exchange.arrived(got, sent_to)
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 1.5, MAX_PULL_S)
    return replies
