"""A site's own audit log: what it checked, trained, sent or declined, hash-chained, on its own disk."""

from __future__ import annotations

from fedtransfer.client.secure import config_of
from fedtransfer.client.site import Site
from fedtransfer.common.storage.audit_log import AuditLog
from fedtransfer.common.wire.protocol import Cfg, Event
from flwr.app import Message


def record(site: Site, msg: Message, event: Event, *, as_round: int | None = None, **fields: object) -> None:
    """Append `event` about `msg` to the site's log (never sent anywhere).

    `as_round`: the round the record is about when it is not the message's own: an evaluation carried by
    round r's training message scores the model of round r − 1, and is logged (and charged) as that round's.
    """
    conf = config_of(msg)
    rnd = conf.get(Cfg.SERVER_ROUND) if as_round is None else as_round
    AuditLog(site.audit_path).append(
        event,
        site=site.name,
        run_id=str(conf.get(Cfg.RUN_ID, "")),
        round=rnd if type(rnd) is int else None,  # a malformed message is logged too, as it came
        message_type=msg.metadata.message_type,
        **fields,
    )
