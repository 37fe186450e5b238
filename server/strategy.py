"""Aggregation of head updates: Flower's strategies, fed only with replies that pass checks.

Sites send head tensors only; before Flower's FedAvg/FedProx/FedAdam sees a reply, it
must carry exactly the head's tensor names, shapes and dtypes, all finite.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Message
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Strategy

from common.config import TrainConfig
from common.exchange import Spec, check_arrays


def make_strategy(t: TrainConfig) -> Strategy:
    sampling = {
        "fraction_train": t.fraction_train,
        "fraction_evaluate": t.fraction_evaluate,
        "min_train_nodes": t.min_sites,
        "min_evaluate_nodes": t.min_sites if t.fraction_evaluate > 0 else 0,
        "min_available_nodes": t.min_sites,
    }
    if t.strategy == "fedprox":
        return FedProx(proximal_mu=t.proximal_mu, **sampling)
    if t.strategy == "fedadam":
        return FedAdam(eta=t.server_learning_rate, **sampling)
    if t.strategy == "fedmedian":  # robust: coordinate-wise median
        return FedMedian(**sampling)
    if t.strategy == "fedtrimmedavg":  # robust: drop the trimmed_beta extremes per coordinate
        return FedTrimmedAvg(beta=t.trimmed_beta, **sampling)
    return FedAvg(**sampling)


def strategy_state(strategy: Strategy) -> dict:
    """The part of a strategy that carries over between rounds (FedAdam's moments)."""
    return {k: dict(v) for k in ("m_t", "v_t") if (v := getattr(strategy, k, None))}


def restore_strategy_state(strategy: Strategy, state: dict) -> None:
    for key, arrays in state.items():
        setattr(strategy, key, dict(arrays))


@dataclass(frozen=True)
class Screened:
    accepted: list[Message]
    refused: list[tuple[Message, str, str]]  # (reply, site name, reason)


def site_name(reply: Message, known: dict[int, str]) -> str:
    """A reply's site: from its own record, else the name learnt earlier for its node."""
    node = reply.metadata.src_node_id
    if not reply.has_error() and "site" in reply.content.config_records:
        known[node] = str(reply.content["site"]["name"])
    elif reply.has_error():
        return site_name_from(node, reply.error.reason or "", known)
    return known.get(node, f"node-{node}")


def site_name_from(node: int, reason: str, known: dict[int, str]) -> str:
    """The site behind an error reason: our ClientApp prefixes its refusals with the site name."""
    head = reason.split(":", 1)[0]
    if node not in known and head and " " not in head:
        known[node] = head
    return known.get(node, f"node-{node}")


def screen_train_replies(
    replies: list[Message],
    spec: Spec,
    known: dict[int, str],
    max_norm: float | None = None,
    reference: dict[str, np.ndarray] | None = None,
) -> Screened:
    """Split replies into updates fit to aggregate and refusals, each refusal with its site and reason."""
    accepted, refused = [], []
    for reply in replies:
        name = site_name(reply, known)
        if reply.has_error():
            reason = reply.error.reason or f"error code {reply.error.code}"
            refused.append((reply, name, reason.removeprefix(f"{name}: ")))
            continue
        arrays = reply.content.array_records
        metrics = reply.content.metric_records
        if len(arrays) != 1 or len(metrics) != 1 or "num-examples" not in next(iter(metrics.values())):
            refused.append((reply, name, "malformed reply: needs one head ArrayRecord and one MetricRecord"))
            continue
        reason = check_arrays(next(iter(arrays.values())), spec, max_norm, reference)
        if reason is not None:
            refused.append((reply, name, f"update refused: {reason}"))
            continue
        accepted.append(reply)
    return Screened(accepted, refused)
