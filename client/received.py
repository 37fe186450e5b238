"""What a site reads out of a server message before it touches data: the round, the head, the config.

Training and evaluation both start here (client/train_round.py, client/evaluate_round.py): the message is
checked (types, run id, the backbone's fingerprint) before any data is read, and the head is built in the
run's shape, or the message declined.
"""

from __future__ import annotations

from fedtransfer.client.replay import RUN_ID
from fedtransfer.client.secure import instructions
from fedtransfer.client.site import Declined, Site
from fedtransfer.client.site_log import record
from fedtransfer.common.config.run import RunConfig
from fedtransfer.common.model.finetune import make_top
from fedtransfer.common.privacy.evaluation import NAMES
from fedtransfer.common.wire.exchange import load_head
from fedtransfer.common.wire.protocol import Cfg, Event
from flwr.app import ArrayRecord, ConfigRecord, Message
from torch import nn


def received_head(site: Site, msg: Message) -> tuple[int, ArrayRecord, ConfigRecord]:
    """The round, head and config of a server message, checked before touching data: types, fingerprint."""
    try:
        arrays, conf = instructions(msg)
    except (KeyError, ValueError, TypeError) as err:
        raise Declined(f"malformed message: {str(err)[:200]}") from None
    if any(name in NAMES for name in arrays):  # the evaluation's masked slots: the reply's to fill, not the head
        arrays = ArrayRecord({k: v for k, v in arrays.items() if k not in NAMES})
    for key, kind in ((Cfg.SERVER_ROUND, int), (Cfg.RUN_ID, str), (Cfg.FINGERPRINT, str)):
        if type(conf.get(key)) is not kind:
            got = type(conf.get(key)).__name__
            raise Declined(f"malformed message: config {str(key)!r} must be {kind.__name__}, got {got}")
    if not RUN_ID.fullmatch(str(conf[Cfg.RUN_ID])):  # it names the site's reply-cache file
        raise Declined(f"malformed message: config {str(Cfg.RUN_ID)!r} must be 1-64 letters, digits, '-', '_' or '.'")
    announced = str(conf[Cfg.FINGERPRINT])
    if announced != site.backbone.fingerprint:
        raise Declined(
            f"backbone fingerprint mismatch: the server announced {announced[:16]}…, this site's "
            f"{site.backbone.name} has {site.backbone.fingerprint[:16]}…; load the same weights as the server"
        )
    record(site, msg, Event.BACKBONE_CHECKED, fingerprint=site.backbone.fingerprint)
    return int(conf[Cfg.SERVER_ROUND]), arrays, conf


def local_head(site: Site, cfg: RunConfig, arrays: ArrayRecord | None, num_classes: int) -> nn.Module:
    """A head of this run's shape with the server's weights; a head of another shape is declined.

    `arrays` None: the statistics release under SecAgg+, whose message carries the release's shape, not
    a head; the release needs only the head's size (for the plan), not its weights.
    """
    head = make_top(
        site.backbone, num_classes, hidden=cfg.head.hidden, centred=cfg.privacy.feature_stats, ft=cfg.finetune
    )
    try:
        if arrays is not None:
            load_head(head, arrays)
    except ValueError as err:
        raise Declined(str(err)) from None
    return head.to(site.backbone.device)
