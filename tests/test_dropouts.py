"""A site that drops out is named, whether flwr 1.41 answers for it (heartbeat lapsed) or nothing comes back."""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Error, Message, Metadata, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.proto.node_pb2 import NodeInfo

from server.federation import _learn_registered_names, _split_replies


def _metadata(message_id: str, src: int, dst: int, reply_to: str = "") -> Metadata:
    return Metadata(run_id=1, message_id=message_id, src_node_id=src, dst_node_id=dst, reply_to_message_id=reply_to,
                    group_id="1", created_at=time.time(), ttl=600.0, message_type="train")  # fmt: skip


def test_superlink_answers_are_attributed_to_the_node_they_were_for() -> None:
    sent = [Message(content=RecordDict(), metadata=_metadata(f"m-{n}", SUPERLINK_NODE_ID, n)) for n in (10, 20, 30)]
    trained = Message(content=RecordDict({"site": ConfigRecord({"name": "a"})}), metadata=_metadata("r", 10, 1, "m-10"))
    declined = Message(error=Error(code=4001, reason="c: site policy"), metadata=_metadata("d", 30, 1, "m-30"))
    lapsed = Message(
        error=Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Error: Node Unavailable"),
        metadata=_metadata("u", SUPERLINK_NODE_ID, SUPERLINK_NODE_ID, "m-20"),
    )
    from_sites, gone = _split_replies(sent, [trained, lapsed, declined])
    assert from_sites == [trained, declined]  # a site's own refusal stays the site's reply
    assert gone == {20: "Error: Node Unavailable"}
    _, nothing = _split_replies(sent, [trained])  # a node still believed alive: no reply at all
    assert nothing == {}


def test_registered_names_name_sites_that_never_replied() -> None:
    class Grid:
        def get_nodes(self) -> list[NodeInfo]:
            return [NodeInfo(node_id=20, name="hospital-b"), NodeInfo(node_id=30)]

    names = {10: "hospital-a"}
    _learn_registered_names(Grid(), names)
    assert names == {10: "hospital-a", 20: "hospital-b"}
