"""Server messages to one site, as tests hand them to the site's code directly (no Grid)."""

from __future__ import annotations

import time

from fedtransfer.common.wire.exchange import head_to_arrays
from flwr.app import ConfigRecord, Message, Metadata, RecordDict
from torch import nn

FINGERPRINT = "f" * 64  # the backbone fingerprint the tests' stand-in backbones carry


def to_site(
    content: RecordDict,
    *,
    message_type: str = "train",
    message_id: str = "m",
    group_id: str = "1",
    src_node_id: int = 0,
    dst_node_id: int = 1,
    ttl: float = 60.0,
) -> Message:
    """A message from the server carrying `content`, as a SuperNode would deliver it."""
    meta = Metadata(
        run_id=1,
        message_id=message_id,
        src_node_id=src_node_id,
        dst_node_id=dst_node_id,
        reply_to_message_id="",
        group_id=group_id,
        created_at=time.time(),
        ttl=ttl,
        message_type=message_type,
    )
    return Message(content=content, metadata=meta)


def train_message(head: nn.Module, server_round: int, **config: str | int | float) -> Message:
    """Round `server_round`'s training message carrying `head`, with the run id "r" and `config` added."""
    conf = {"server-round": server_round, "run-id": "r", "backbone-fingerprint": FINGERPRINT} | config
    content = RecordDict({"arrays": head_to_arrays(head), "config": ConfigRecord(conf)})
    return to_site(content, group_id=str(server_round))
