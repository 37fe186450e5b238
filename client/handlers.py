"""What a site does with a message: one dispatch, run by the ClientApp itself or by the site's worker.

A refusal (budget spent, backbone mismatch, policy, bad data, malformed message) is
answered with a `Refusal` error reply that names the site and the reason, so the server
records it and carries on with the other sites. Anything else that goes wrong is a bug and
is raised: Flower answers it with an error reply of its own (the server records the site as
failed) and logs the traceback at the site.

`client_app.py` calls `handle` in its own process, or has the site worker
(`client/site_worker.py`) call it: the same function either way, so a message is answered
the same wherever it runs. This module imports torch and Opacus; `client_app.py` imports
it only when it answers in its own process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from fedtransfer.client import evaluate_round, train_round
from fedtransfer.client.secure import config_of, head_names
from fedtransfer.client.site import PROCESS_CACHE, Declined, Site, get_site
from fedtransfer.client.site_log import record
from fedtransfer.common.config.run import ConfigError, RunConfig, config_from_run_config
from fedtransfer.common.data.sources import DataError
from fedtransfer.common.encoders.interface import EncoderError
from fedtransfer.common.encoders.process_cache import ProcessCache
from fedtransfer.common.privacy.ledger import BudgetExceeded
from fedtransfer.common.storage import locking
from fedtransfer.common.storage.audit_log import update_digest
from fedtransfer.common.wire.exchange import masked_arrays
from fedtransfer.common.wire.protocol import Event, Refusal
from flwr.app import Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

REFUSALS = (Declined, BudgetExceeded, ConfigError, DataError, EncoderError, locking.FolderInUse)
STATE_LOCK_WAIT_S = 120.0  # another process of this site (an earlier message) may still be writing its ledger
# Training or scoring a head on cached features is many tiny ops (a 1280 x 10 layer on batches of tens): torch's
# intra-op thread pool only adds waiting, and on a busy or shared machine a 0.2 s message took 2-4 s with 2 threads
# (docs/explanation/architecture.md, prepared state). One thread also makes the result independent of the core count.
HEAD_THREADS = 1
Handler = Callable[[Site, RunConfig, Message], RecordDict]


def handle(msg: Message, context: Context, cache: ProcessCache = PROCESS_CACHE) -> Message:
    """The reply to a train or evaluate message; `cache` is where the site is kept (see get_site)."""
    handlers: dict[str, Handler] = {MessageType.TRAIN: train_round.train, MessageType.EVALUATE: evaluate_round.evaluate}
    kind = msg.metadata.message_type
    if kind not in handlers:
        raise ValueError(f"a fedtransfer site answers train and evaluate messages, not {kind!r}")
    return _answer(msg, context, handlers[kind], cache)


def record_masked(
    msg: Message, context: Context, masked: RecordDict, replayed: bool, cache: ProcessCache = PROCESS_CACHE
) -> None:
    """Log the masked vectors secaggplus_mod made of our head (`masked`, its reply) as what left the site.

    The plain head stays in the update-trained record of the training itself, on the site's own disk.
    """
    names = head_names(config_of(msg))
    vectors = [bytes_to_ndarray(b) for b in masked[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
    site = get_site(context, config_from_run_config(context.run_config), cache)
    digest = update_digest(masked_arrays(vectors, names))
    # the round's DP parameters are in the update-trained record of the training itself
    record(site, msg, Event.UPDATE_SENT, update=digest, dp=None, masked=True, replayed=replayed)


def _answer(msg: Message, context: Context, handler: Handler, cache: ProcessCache) -> Message:
    """The handler's reply, or a Refusal naming the site; only the site's own refusals are caught."""
    name = str(context.node_config.get("partition-id", context.node_config.get("site-config", "site")))
    site = None
    try:
        cfg = config_from_run_config(context.run_config)
        site = get_site(context, cfg, cache)
        name = site.name
        lock = locking.hold(site.state_dir, "a fedtransfer ClientApp", wait_s=STATE_LOCK_WAIT_S, name=".message.lock")
        with lock, _threads(work_threads(cfg)):
            return Message(handler(site, cfg, msg), reply_to=msg)
    except REFUSALS as err:
        reason = str(err)
        if site is not None:
            record(site, msg, Event.DECLINED, reason=reason)
        return Message(Refusal(name, reason).to_error(), reply_to=msg)


def work_threads(cfg: RunConfig) -> int | None:
    """Threads for answering a message of `cfg` once its site is built; None keeps torch's own count.

    A head on cached features gets HEAD_THREADS. Fine-tuning runs backbone blocks (convolutions, attention),
    where more threads do pay off, so it keeps the process's setting.
    """
    return None if cfg.finetune.active else HEAD_THREADS


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `count` for the block, then as they were (a worker answers many messages)."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
