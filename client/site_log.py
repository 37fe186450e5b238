"""A site's own audit log: what it checked, trained, sent or declined, hash-chained, on its own disk."""

from __future__ import annotations

from flwr.app import Message

from client.secure import config_of
from client.site import Site
from common.audit_log import AuditLog
from common.protocol import Cfg, Event


def record(site: Site, msg: Message, event: Event, **fields: object) -> None:
    """Append `event` about `msg` to the site's log (never sent anywhere)."""
    conf = config_of(msg)
    rnd = conf.get(Cfg.SERVER_ROUND)
    AuditLog(site.audit_path).append(
        event,
        site=site.name,
        run_id=str(conf.get(Cfg.RUN_ID, "")),
        round=rnd if type(rnd) is int else None,  # a malformed message is logged too, as it came
        message_type=msg.metadata.message_type,
        **fields,
    )
