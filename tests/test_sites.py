"""Every reply is attributed to the node it was sent to, and a site's name comes only from its own records.

flwr 1.41 answers a message to a node whose heartbeat lapsed with an error reply from the
SuperLink ("Error: Node Unavailable"); a node still believed alive just never replies. Either
way the site is a dropout of that node, never a site called "Error". A name with a colon or a
space travels intact in the site's Refusal or SITE record.
"""

from __future__ import annotations

import time

from fedtransfer.common.wire.protocol import Refusal, SiteStatus, site_record
from fedtransfer.server.federation.sites import SiteBook, absent_sites, answers
from flwr.app import ConfigRecord, Error, Message, Metadata, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.proto.node_pb2 import NodeInfo

TIMEOUT = 30.0


def _metadata(message_id: str, src: int, dst: int, reply_to: str = "") -> Metadata:
    return Metadata(
        run_id=1,
        message_id=message_id,
        src_node_id=src,
        dst_node_id=dst,
        reply_to_message_id=reply_to,
        group_id="1",
        created_at=time.time(),
        ttl=600.0,
        message_type="train",
    )


def _sent(*nodes: int) -> list[Message]:
    return [Message(content=RecordDict(), metadata=_metadata(f"m-{n}", SUPERLINK_NODE_ID, n)) for n in nodes]


def _reply(node: int, name: str) -> Message:
    content = RecordDict({"site": site_record(name)})
    return Message(content=content, metadata=_metadata(f"r-{node}", node, 1, f"m-{node}"))


def test_a_lapsed_node_with_no_known_name_is_a_dropout_of_that_node() -> None:
    book = SiteBook()
    lapsed = Message(
        error=Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Error: Node Unavailable"),
        metadata=_metadata("u", SUPERLINK_NODE_ID, SUPERLINK_NODE_ID, "m-20"),
    )
    (answer,) = answers(_sent(20), [lapsed], book, TIMEOUT)
    assert (answer.site, answer.status) == ("node-20", SiteStatus.NO_REPLY)
    assert "Node Unavailable" in answer.reason
    assert book.known == [], "no site called 'Error' (or anything else) was invented"


def test_an_error_that_is_not_a_refusal_is_the_nodes_failure_not_a_name() -> None:
    book = SiteBook()
    crash = Message(
        error=Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="Error: boom"),
        metadata=_metadata("c", 30, 1, "m-30"),
    )
    (answer,) = answers(_sent(30), [crash], book, TIMEOUT)
    assert (answer.site, answer.status) == ("node-30", SiteStatus.FAILED)
    assert book.known == []


def test_site_names_with_colons_and_spaces_are_reported_as_given() -> None:
    book = SiteBook()
    name = "St. Mary's: ward 7 (oncology)"
    declined = Message(
        error=Refusal(name, "site policy: train.rounds 9 > policy.max_rounds 5").to_error(),
        metadata=_metadata("d", 40, 1, "m-40"),
    )
    trained = _reply(50, "bank: branch 12")
    got = {a.node: a for a in answers(_sent(40, 50, 60), [declined, trained], book, TIMEOUT)}
    assert (got[40].site, got[40].status, got[40].reason) == (
        name,
        SiteStatus.DECLINED,
        "site policy: train.rounds 9 > policy.max_rounds 5",
    )
    assert (got[50].site, got[50].status, got[50].reply) == ("bank: branch 12", None, trained)
    assert (got[60].site, got[60].status) == ("node-60", SiteStatus.NO_REPLY)  # never answered: named by its node
    assert book.known == [name, "bank: branch 12"]


def test_a_refusal_relayed_by_someone_else_does_not_name_the_node() -> None:
    book = SiteBook()
    forged = Message(
        error=Refusal("impostor", "nope").to_error(),
        metadata=_metadata("f", SUPERLINK_NODE_ID, SUPERLINK_NODE_ID, "m-70"),
    )
    (answer,) = answers(_sent(70), [forged], book, TIMEOUT)
    assert (answer.site, answer.status) == ("node-70", SiteStatus.NO_REPLY)
    assert "impostor" not in book.known


def test_a_malformed_refusal_text_is_an_ordinary_failure() -> None:
    for reason in ("hospital-a: budget", "", "{not json", '{"format": "fedtransfer-refusal/1", "site": 3}'):
        error = Error(code=4001, reason=reason)
        assert Refusal.from_error(error) is None
    assert Refusal.from_error(Refusal("a: b c", "why").to_error()) == Refusal("a: b c", "why")


def test_registered_names_name_sites_that_never_replied() -> None:
    class Grid:
        def get_nodes(self) -> list[NodeInfo]:
            return [NodeInfo(node_id=20, name="hospital-b"), NodeInfo(node_id=30)]

    book = SiteBook(["hospital-a"])
    assert book.learn_registered(Grid()) == [20, 30]
    assert (book.name(20), book.name(30)) == ("hospital-b", "node-30")
    assert book.known == ["hospital-a", "hospital-b"]


def test_every_known_site_appears_in_every_round() -> None:
    book = SiteBook(["a", "b", "c"])
    absent = absent_sites(book, asked=["a"], connected=["a", "b"])
    assert {n: s.status for n, s in absent.items()} == {"b": SiteStatus.NOT_SELECTED, "c": SiteStatus.OFFLINE}
    expected = {"round": 3, "status": "offline", "reason": "not connected when the round started"}
    assert absent["c"].as_record(3) == expected


def test_a_site_record_names_the_site() -> None:
    content = RecordDict({"site": ConfigRecord({"name": "x"})})
    reply = Message(content=content, metadata=_metadata("r", 5, 1, "m-5"))
    (answer,) = answers(_sent(5), [reply], SiteBook(), TIMEOUT)
    assert answer.site == "x"
