"""The ClientApp: a site trains the head on its cached features under DP and sends only the head.

What a site does with a message is `fedtransfer.client.handlers.handle`. A deployed site whose node config
names its worker's socket (`site-worker`, set by `fedtransfer deploy site`) has the worker run
it (client/site_worker.py), so this process, one per message in Flower 1.41, imports no torch;
when the worker gives no answer (not running, ended mid-message, other code), this process
runs `handle` itself and logs a warning. A simulation answers in the process.

Mods run here either way: SecAgg+ messages go through Flower's secaggplus_mod, which masks the
head the handler returns before anything leaves the site.
"""

from __future__ import annotations

from collections.abc import Callable

from fedtransfer.client import worker_link
from fedtransfer.client.secure import Refused, is_secure, take_handoff
from fedtransfer.common.storage.private import restrict_umask
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp


def _secure_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """SecAgg+ messages go through Flower's secaggplus_mod, which masks the head our handler returns.

    What leaves the site in secure mode is the masked vector: that is what the site's audit
    log records as sent (the plain head stays in its update-trained record, on its own disk).
    """
    if msg.metadata.message_type != MessageType.TRAIN or not is_secure(msg):
        return call_next(msg, context)

    def handler(m: Message, c: Context) -> Message:
        reply = call_next(m, c)
        if reply.has_error():
            raise Refused(reply)
        return reply

    try:
        reply = secaggplus_mod(msg, context, handler)
    except Refused as refused:
        return refused.reply
    if (replayed := take_handoff(reply)) is not None and not worker_link.forward_masked(
        msg, context, reply.content, replayed
    ):
        from fedtransfer.client import handlers  # torch: only when this process answers itself

        handlers.record_masked(msg, context, reply.content, replayed)
    return reply


app = ClientApp(mods=[_secure_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _respond(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _respond(msg, context)


def _respond(msg: Message, context: Context) -> Message:
    """The site worker's reply when it gives one, otherwise this process's: the same handler either way.

    The ledger, audit log and reply cache it writes are the site's alone, also where Flower was
    started by hand with a umask that lets others read (`flower-supernode` without `deploy site`).
    """
    restrict_umask()
    if (reply := worker_link.forward(msg, context)) is not None:
        return reply
    from fedtransfer.client import handlers  # torch, Opacus: only when this process answers itself

    return handlers.handle(msg, context)
