"""Our ClientApp with two hostile sites (tests only): partition 0 answers NaNs, partition 1 a 100× head.

Every other site runs our ClientApp unchanged; the hostile ones train honestly first, then
corrupt what they send, as a broken or malicious site would.
"""

from __future__ import annotations

import numpy as np
from fedtransfer.client import client_app
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

NAN_SITE, SCALED_SITE, SCALE = 0, 1, 100.0

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = client_app.train(msg, context)
    partition = int(context.node_config.get("partition-id", -1))
    if reply.has_error() or partition not in (NAN_SITE, SCALED_SITE):
        return reply
    head = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    bad = {k: np.full_like(v, np.nan) if partition == NAN_SITE else v * SCALE for k, v in head.items()}
    reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in bad.items()})
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return client_app.evaluate(msg, context)
