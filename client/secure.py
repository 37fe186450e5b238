"""A site's side of secure aggregation: the message formats of Flower's SecAgg+.

The server's SecAgg+ workflow speaks Flower's legacy FitIns/FitRes records, and Flower's
`secaggplus_mod` (wired in client_app.py) masks the `fitres.parameters` our handler
returns before anything leaves the site. Here: reading the head and config out of either
message format, and turning our reply into the one the mod masks.
"""

from __future__ import annotations

import numpy as np
from fedtransfer.common.config.run import SecAggConfig
from fedtransfer.common.wire.protocol import Cfg, Metric, Rec
from fedtransfer.common.wire.secure_sum import to_grid
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import Code, FitRes, Status, ndarray_to_bytes, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

HANDOFF = "fedtransfer.handoff"  # from our handler to our mod, popped before the reply leaves the site


class Refused(Exception):
    """A site's error reply, carried out through secaggplus_mod (which expects a successful reply)."""

    def __init__(self, reply: Message) -> None:
        super().__init__(reply.error.reason)
        self.reply = reply


def is_secure(msg: Message) -> bool:
    return msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records


def config_of(msg: Message) -> ConfigRecord:
    """The run's instructions from a plain ("config") or SecAgg+ ("fitins.config") message."""
    records = msg.content.config_records if msg.has_content() else {}
    return records.get(Rec.CONFIG, records.get("fitins.config", ConfigRecord()))


def instructions(msg: Message) -> tuple[ArrayRecord, ConfigRecord]:
    """The head and config of a training message, in either format; KeyError/ValueError when malformed."""
    if "fitins.config" not in msg.content.config_records:
        return msg.content[Rec.ARRAYS], msg.content[Rec.CONFIG]
    conf = msg.content["fitins.config"]
    names = head_names(conf)
    values = parameters_to_ndarrays(compat.recorddict_to_fitins(msg.content, keep_input=True).parameters)
    if len(values) != len(names):
        raise ValueError(f"malformed message: {len(values)} tensors for {len(names)} head-names")
    return ArrayRecord({n: Array(v) for n, v in zip(names, values, strict=True)}), conf


def head_names(conf: ConfigRecord) -> list[str]:
    """The head's tensor names, in the order SecAgg+ carries the tensors."""
    names = conf[Cfg.HEAD_NAMES]
    if not isinstance(names, str) or not names:
        raise ValueError("malformed message: config 'head-names' must be the comma-separated tensor names")
    return names.split(",")


def secure_reply(
    answer: RecordDict,
    names: list[str],
    settings: SecAggConfig,
    replayed: bool,
    quanta: dict[str, float] | None = None,
) -> RecordDict:
    """Our reply as the FitRes secaggplus_mod masks; refuses a head SecAgg+ would clip silently.

    A sum the server must read back exactly (a fedsgd gradient sum, the feature statistics;
    `quanta`: each tensor's unit γ) goes as integers on Flower's grid with weight max_weight
    (common/wire/secure_sum.py).
    """
    try:
        head = [answer[Rec.ARRAYS][n].numpy() for n in names]
    except KeyError as err:
        raise ValueError(f"the server asked for tensor {err} this reply does not hold") from None
    examples = int(answer[Rec.METRICS][Metric.NUM_EXAMPLES])
    if examples > settings.max_weight:  # under fedsgd it also sets γ (SecAggConfig.quantum): no wrap-around
        raise ValueError(
            f"this site trains on more examples than secagg.max_weight = {settings.max_weight:g}; "
            "the run must raise secagg.max_weight"
        )
    if quanta is not None:
        head = [
            to_grid(v, quanta[n], settings.clipping_range, settings.quantization_range)
            for n, v in zip(names, head, strict=True)
        ]
        examples = int(settings.max_weight)
    largest = max(float(np.max(np.abs(v))) for v in head) * examples / settings.max_weight
    if largest > settings.clipping_range:
        raise ValueError(
            f"a head value × examples / secagg.max_weight is {largest:.3g}, outside secagg.clipping_range "
            f"±{settings.clipping_range:g}; the run must raise secagg.clipping_range"
        )
    fitres = FitRes(Status(Code.OK, "trained"), ndarrays_to_parameters(head), examples, {})
    out = compat.fitres_to_recorddict(fitres, keep_input=True)
    for key, record in [*answer.metric_records.items(), *answer.config_records.items()]:
        out[key] = record
    if Rec.EVALUATION in answer.array_records:  # a carried evaluation: beside the masked vector, not in it
        out[Rec.EVALUATION_BYTES] = ConfigRecord(
            {k: ndarray_to_bytes(v.numpy()) for k, v in answer[Rec.EVALUATION].items()}
        )
    out[HANDOFF] = ConfigRecord({"replayed": replayed})
    return out


def take_handoff(reply: Message) -> bool | None:
    """Remove the handoff from a masked reply: whether it re-sends a cached head; None when there is none."""
    if reply.has_error() or HANDOFF not in reply.content.config_records:
        return None
    return bool(reply.content.config_records.pop(HANDOFF)["replayed"])
