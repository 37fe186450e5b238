"""A ServerApp that records everything the server receives, then runs ours (tests only).

`test_secure_aggregation.py` submits a copy of the app whose serverapp is this module, so
every reply our ServerApp could see passes through `Spy.pull_messages` first and is
pickled to `<output_dir>/received.pkl`. With FEDTRANSFER_SPY_DROP_ROUND=r set, the masked
vector of one site (the lowest node id the stage was sent to) is lost in round r, as a
network would lose it.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedtransfer.server.federation import server_app
from fedtransfer.server.federation.sites import send_and_receive
from flwr.app import Context, Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


class Spy:
    def __init__(self, grid: Grid, out: Path, drop_round: str | None) -> None:
        self._grid, self._out, self._drop_round = grid, out, drop_round
        self._lowest: dict[str, int] = {}  # message id -> the lowest node its stage was sent to
        self.received: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        ids = list(self._grid.push_messages(messages))
        lowest = min((m.metadata.dst_node_id for m in messages), default=0)
        self._lowest.update(dict.fromkeys(ids, lowest))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        kept = []
        for reply in self._grid.pull_messages(message_ids):
            lost = self._lowest.get(reply.metadata.reply_to_message_id)
            dropped = (
                _is_masked(reply) and reply.metadata.group_id == self._drop_round and reply.metadata.src_node_id == lost
            )
            self.received.append(_summary(reply) | {"dropped": dropped})
            if not dropped:
                kept.append(reply)
        self._out.parent.mkdir(parents=True, exist_ok=True)
        self._out.write_bytes(pickle.dumps(self.received))
        return kept

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return send_and_receive(self, messages, 3600.0 if timeout is None else timeout)


def _is_masked(reply: Message) -> bool:
    return (not reply.has_error()) and Key.MASKED_PARAMETERS in reply.content.config_records.get(RECORD_KEY_CONFIGS, {})


def _summary(reply: Message) -> dict[str, Any]:
    out: dict[str, Any] = {
        "node": reply.metadata.src_node_id,
        "round": reply.metadata.group_id,
        "type": reply.metadata.message_type,
        "error": reply.has_error(),
    }
    if not reply.has_error():
        content = reply.content
        out["arrays"] = {n: {k: a.numpy() for k, a in rec.items()} for n, rec in content.array_records.items()}
        out["configs"] = {n: dict(rec) for n, rec in content.config_records.items()}
        out["metrics"] = {n: dict(rec) for n, rec in content.metric_records.items()}
    return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    out = Path(str(context.run_config["output_dir"])) / "received.pkl"
    server_app.main(Spy(grid, out, os.environ.get("FEDTRANSFER_SPY_DROP_ROUND")), context)
