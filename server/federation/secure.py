"""One round of secure aggregation: Flower's SecAgg+ workflow, driven from our round loop.

`SecAggPlusWorkflow` runs its four stages (setup, share keys, collect masked vectors,
unmask) over the Grid and hands the reconstructed weighted mean to a legacy strategy's
`aggregate_fit`. We give it a strategy that only asks the sites our round loop chose and
keeps that mean, and a Grid tap that sees every reply on its way in: the tap is where the
server logs what it received (masked vectors, never a plain head) and counts the bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fedtransfer.common.config.run import ConfigError, SecAggConfig
from fedtransfer.common.wire.exchange import masked_arrays
from fedtransfer.common.wire.protocol import Cfg
from fedtransfer.server.federation.sites import send_and_receive
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    bytes_to_ndarray,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server import ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

MODULUS = 2**32  # Flower's default modulus_range: all masked sums live modulo this


@dataclass
class SecureRound:
    """What one SecAgg+ round left the server with: the mean, and per node only masked or public data."""

    aggregate: ArrayRecord | None = None  # weighted mean of the heads of the sites that sent masked vectors
    mean64: list[np.ndarray] | None = None  # the same mean in float64, as dequantised (fedsgd reads the sum from it)
    masked: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # node -> its masked vectors, named
    trained: dict[int, Message] = field(default_factory=dict)  # node -> its stage-2 reply (metrics, no arrays)
    errors: dict[int, Message] = field(default_factory=dict)  # node -> the error reply with which it left
    payload: dict[int, int] = field(default_factory=dict)  # node -> protocol bytes it sent, all stages
    threshold: int = 0
    num_shares: int = 0


def secure_round(
    grid: Grid,
    rnd: int,
    arrays: ArrayRecord,
    *,
    config: ConfigRecord,
    node_ids: Iterable[int],
    settings: SecAggConfig,
    timeout: float,
    per_node: dict[int, dict[str, int]] | None = None,
) -> SecureRound:
    """Run SecAgg+ for one round among `node_ids`; the server learns only the weighted mean.

    `per_node`: config entries for some nodes only (the evaluation a training message asks for).
    """
    nodes = sorted(node_ids)
    if len(nodes) * settings.quantization_range >= MODULUS:
        raise ConfigError(
            f"secagg.quantization_range: {len(nodes)} sites × {settings.quantization_range} levels overflow "
            f"SecAgg+'s 2**32 modulus; lower it below {MODULUS // len(nodes)}"
        )
    names = list(arrays.keys())
    result = SecureRound()
    tap = _Tap(grid, names, result)
    workflow = SecAggPlusWorkflow(
        num_shares=_count_or_share(settings.num_shares),
        reconstruction_threshold=_count_or_share(settings.reconstruction_threshold),
        max_weight=settings.max_weight,
        clipping_range=settings.clipping_range,
        quantization_range=settings.quantization_range,
        modulus_range=MODULUS,
        timeout=timeout,
    )
    # legacy FitIns configs hold scalars only: the head's tensor names travel as one comma-separated string
    fit_config = ConfigRecord({**dict(config), Cfg.SERVER_ROUND: rnd, Cfg.HEAD_NAMES: ",".join(names)})
    strategy = _KeepMean(tap, nodes, fit_config, per_node or {})
    context = LegacyContext(
        Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=rnd),
        strategy=strategy,
    )
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord(
        {str(i): Array(arrays[n].numpy()) for i, n in enumerate(names)}
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd})
    workflow(tap, context)
    if strategy.mean is not None:
        values = parameters_to_ndarrays(strategy.mean)
        result.mean64 = [np.asarray(v, dtype=np.float64) for v in values]
        result.aggregate = ArrayRecord(
            {n: Array(v.astype(arrays[n].dtype, copy=False)) for n, v in zip(names, values, strict=True)}
        )
    return result


def _count_or_share(value: float) -> int | float:
    """Our config's one number to Flower's int (a count) or float (a share)."""
    return int(value) if value > 1 else float(value)


class _Tap:
    """The Grid, seen by the workflow; every reply passes here on its way to it."""

    def __init__(self, grid: Grid, names: list[str], result: SecureRound) -> None:
        self._grid, self._names, self._result = grid, names, result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        replies = send_and_receive(self._grid, messages, timeout if timeout is not None else 3600.0)
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                # a SuperLink answering for a lapsed node sends it from itself: attribute it to the node asked
                node = sent_to.get(reply.metadata.reply_to_message_id, node)
                self._result.errors[node] = reply
                continue
            record = reply.content.config_records.get(RECORD_KEY_CONFIGS, ConfigRecord())
            self._result.payload[node] = self._result.payload.get(node, 0) + payload_bytes(record)
            if Key.MASKED_PARAMETERS in record:
                vectors = [bytes_to_ndarray(b) for b in record[Key.MASKED_PARAMETERS]]
                if len(vectors) == len(self._names) + 1:
                    self._result.masked[node] = masked_arrays(vectors, self._names)
                self._result.trained[node] = reply
        return replies


def payload_bytes(record: ConfigRecord) -> int:
    """Bytes of a protocol record's values: keys, key shares, masked vectors (8 per number)."""
    total = 0
    for value in record.values():
        for item in value if isinstance(value, list) else [value]:
            total += len(item) if isinstance(item, bytes | str) else 8
    return total


class _KeepMean(LegacyStrategy):
    """The legacy strategy SecAggPlusWorkflow drives: our chosen sites in, the unmasked mean out.

    Aggregation proper (FedAvg, FedProx, FedAdam's server step) stays with our round loop's
    strategy, which gets the mean as if one site had sent it.
    """

    def __init__(self, grid: Grid, nodes: list[int], config: ConfigRecord, per_node: dict[int, dict[str, int]]) -> None:
        self._grid, self._nodes, self._config, self._per_node = grid, nodes, config, per_node
        self.mean: Parameters | None = None

    def initialize_parameters(self, client_manager: Any) -> None:
        return None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:
        run_id = self._grid.run.run_id
        return [
            (
                GridClientProxy(node, self._grid, run_id),
                FitIns(parameters, {**self._config, **self._per_node.get(node, {})}),
            )
            for node in self._nodes
        ]

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list
    ) -> tuple[Parameters | None, dict]:
        # SecAgg+ replaced every result's parameters with the one reconstructed mean
        self.mean = results[0][1].parameters if results else None
        return self.mean, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None
