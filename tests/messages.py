"""The server's training message to one site, as tests hand it to the site's code directly (no Grid)."""

from __future__ import annotations

import time

from fedtransfer.common.wire.exchange import head_to_arrays
from flwr.app import ConfigRecord, Message, Metadata, RecordDict
from torch import nn

FINGERPRINT = "f" * 64  # the backbone fingerprint the tests' stand-in backbones carry


def train_message(head: nn.Module, server_round: int, **config: str | int | float) -> Message:
    """Round `server_round`'s training message carrying `head`, with the run id "r" and `config` added."""
    meta = Metadata(
        run_id=1,
        message_id="m",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id=str(server_round),
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )
    conf = {"server-round": server_round, "run-id": "r", "backbone-fingerprint": FINGERPRINT} | config
    return Message(content=RecordDict({"arrays": head_to_arrays(head), "config": ConfigRecord(conf)}), metadata=meta)
