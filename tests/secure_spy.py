"""A ServerApp that records everything the server receives, then runs ours (tests only).

`test_secure_aggregation.py` submits a copy of the app whose serverapp is this module, so
every reply our ServerApp could see passes through `Spy.send_and_receive` first and is
pickled to `<output_dir>/received.pkl`. With FEDTRANSFER_SPY_DROP_ROUND=r set, the masked
vector of one site (the lowest node id) is lost in round r, as a network would lose it.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.serverapp import Grid, ServerApp

from server import server_app

app = ServerApp()


class Spy:
    def __init__(self, grid: Grid, out: Path, drop_round: str | None) -> None:
        self._grid, self._out, self._drop_round = grid, out, drop_round
        self.received: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        masked = [r for r in replies if _is_masked(r)]
        lost = None
        if masked and masked[0].metadata.group_id == self._drop_round:
            lost = min(r.metadata.src_node_id for r in masked)
        kept = []
        for reply in replies:
            dropped = _is_masked(reply) and reply.metadata.src_node_id == lost
            self.received.append(_summary(reply) | {"dropped": dropped})
            if not dropped:
                kept.append(reply)
        self._out.parent.mkdir(parents=True, exist_ok=True)
        self._out.write_bytes(pickle.dumps(self.received))
        return kept


def _is_masked(reply: Message) -> bool:
    return (not reply.has_error()) and Key.MASKED_PARAMETERS in reply.content.config_records.get(RECORD_KEY_CONFIGS, {})


def _summary(reply: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"node": reply.metadata.src_node_id, "round": reply.metadata.group_id,
                           "type": reply.metadata.message_type, "error": reply.has_error()}  # fmt: skip
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
