"""A federation must survive garbage: property tests of update checks and message decoding, and a
robust aggregator that keeps accuracy when one site sends NaNs and another a scaled-up update."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from fedtransfer.client import client_app
from fedtransfer.common.config.run import BackboneConfig, RunConfig, TrainConfig, config_from_dict, to_run_config
from fedtransfer.common.data.federation import partition_iid, split_holdout
from fedtransfer.common.data.sources import load_source
from fedtransfer.common.encoders.feature_cache import extract
from fedtransfer.common.encoders.image import load_backbone
from fedtransfer.common.model.head import evaluate_head, make_head
from fedtransfer.common.privacy.calibration import plan_dp
from fedtransfer.common.privacy.dp_sgd import LocalTraining, train_head
from fedtransfer.common.wire.exchange import check_arrays, head_spec, head_to_arrays, load_head
from fedtransfer.common.wire.protocol import Refusal
from fedtransfer.server.federation.strategy import ScreenedStrategy, make_strategy
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

HEAD = make_head(16, 4)
SPEC = head_spec(HEAD)
NAMES = [*SPEC, "head.0.weight", "backbone.features.0.weight", ""]

arrays_st = st.dictionaries(
    st.sampled_from(NAMES) | st.text(max_size=12),
    hnp.arrays(
        dtype=st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.uint8]),
        shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),
    ),  # hypothesis' default elements include NaN, ±Inf and extreme values for float dtypes
    max_size=4,
)


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


@settings(max_examples=300, deadline=None)
@given(arrays=arrays_st, max_norm=st.none() | st.floats(min_value=1e-6, max_value=1e6))
def test_update_check_never_crashes_and_names_a_reason(arrays: dict[str, np.ndarray], max_norm: float | None) -> None:
    reason = check_arrays(_record(arrays), SPEC, max_norm)
    assert reason is None or (isinstance(reason, str) and reason)


@settings(max_examples=200, deadline=None)
@given(
    weight=hnp.arrays(np.float32, (4, 16), elements=st.floats(width=32, allow_nan=True, allow_infinity=True)),
    bias=hnp.arrays(np.float32, (4,), elements=st.floats(width=32, allow_nan=True, allow_infinity=True)),
)
def test_update_check_accepts_exactly_the_finite_head(weight: np.ndarray, bias: np.ndarray) -> None:
    reason = check_arrays(_record({"head.1.weight": weight, "head.1.bias": bias}), SPEC)
    finite = bool(np.isfinite(weight).all() and np.isfinite(bias).all())
    assert (reason is None) == finite
    if not finite:
        assert "NaN or Inf" in reason


def test_update_norm_bound_is_measured_from_the_rounds_head() -> None:
    ref = {k: v.numpy() for k, v in head_to_arrays(HEAD).items()}
    moved = {k: v + (3.0 if k.endswith("bias") else 0.0) for k, v in ref.items()}  # ‖Δ‖ = 3·√4 = 6
    assert check_arrays(_record(moved), SPEC, max_norm=6.5, reference=ref) is None
    assert "exceeds train.max_update_norm" in check_arrays(_record(moved), SPEC, max_norm=5.5, reference=ref)


# --- the ClientApp decodes whatever the server sends without crashing -------------------------------

config_values = (
    st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.booleans()
    | st.lists(st.integers(0, 9), max_size=3)
)
config_keys = st.sampled_from(["server-round", "run-id", "backbone-fingerprint", "app-version", "proximal-mu"])


@pytest.fixture(scope="module")
def site_context(tmp_path_factory: pytest.TempPathFactory) -> tuple[Context, str]:
    out = tmp_path_factory.mktemp("site")
    cfg = config_from_dict(
        {
            "output_dir": str(out),
            "cache_dir": str(out / "cache"),
            "backbone": {"image_size": 32},
            "data": {"source": "digits", "max_samples": 120, "num_sites": 2},
            "train": {"protocol": "fedavg"},  # robust strategies combine one model per site
            "privacy": {"feature_stats": False},
        }
    )
    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config=to_run_config(cfg),
    )
    return ctx, load_backbone(cfg.backbone).fingerprint


def _message(content: RecordDict, message_id: str, src: int, dst: int, reply_to: str = "") -> Message:
    """A train message with explicit metadata: flwr 1.41 fills it only inside a running app."""
    meta = Metadata(
        run_id=1,
        message_id=message_id,
        src_node_id=src,
        dst_node_id=dst,
        reply_to_message_id=reply_to,
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type="train",
    )
    return Message(content=content, metadata=meta)


def _server_message(content: RecordDict) -> Message:
    return _message(content, "m", src=0, dst=1)


@pytest.mark.usefixtures("app_process_umask")  # it calls the ClientApp in this process
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    config=st.dictionaries(config_keys | st.text(max_size=8), config_values, max_size=6),
    arrays=arrays_st,
    with_arrays=st.booleans(),
    true_fingerprint=st.booleans(),
)
# a run id that cannot name the site's reply-cache file: once a ValueError, now a refusal naming the key
@example(config={"server-round": 1, "run-id": ""}, arrays={}, with_arrays=True, true_fingerprint=True)
@example(config={"server-round": 1, "run-id": "../x"}, arrays={}, with_arrays=True, true_fingerprint=True)
def test_client_answers_malformed_messages_with_a_named_error(
    site_context: tuple[Context, str], config: dict, arrays: dict, with_arrays: bool, true_fingerprint: bool
) -> None:
    context, fingerprint = site_context
    if true_fingerprint:
        config["backbone-fingerprint"] = fingerprint
    content = RecordDict({"config": ConfigRecord(config)})
    if with_arrays:
        content["arrays"] = _record(arrays)
    answer = client_app.train(_server_message(content), context)  # anything but a refusal would raise here
    assert isinstance(answer, Message)
    if answer.has_error():
        refusal = Refusal.from_error(answer.error)
        assert refusal is not None and refusal.site == "site-0" and refusal.reason


# --- a robust aggregator keeps accuracy under attack --------------------------------------------------


@pytest.fixture(scope="module")
def digits_task() -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    backbone = load_backbone(BackboneConfig(image_size=32))
    pool = load_source("digits", None, 32)
    train, test = split_holdout(len(pool), 0.25, seed=0)
    feats = extract(backbone, pool.inputs)
    labels = torch.from_numpy(pool.labels)
    sites = [(feats[train[p]], labels[train[p]]) for p in partition_iid(pool.labels[train], 6, seed=0)]
    return sites, (feats[test], labels[test])


def _federate(sites: list, test: tuple, strategy_name: str, attackers: bool, rounds: int = 3) -> float:
    """Real strategy objects and our screening on real Messages; sites train with DP as in the ClientApp."""
    torch.manual_seed(0)
    head = make_head(test[0].shape[1], 10)
    arrays, spec = head_to_arrays(head), head_spec(head)
    inner = make_strategy(
        RunConfig(train=TrainConfig(strategy=strategy_name, min_sites=2, trimmed_beta=0.2, protocol="fedavg"))
    )
    strategy = ScreenedStrategy(inner, spec, min_sites=2)
    for rnd in range(1, rounds + 1):
        replies = []
        for i, (x, y) in enumerate(sites):
            local = make_head(x.shape[1], 10)
            load_head(local, arrays)
            plan = plan_dp(
                num_samples=len(y),
                batch_size=32,
                local_epochs=5,
                rounds=rounds,
                target_epsilon=3.0,
                target_delta=1e-4,
                max_grad_norm=1.0,
                accountant="rdp",
            )
            train_head(local, x, y, LocalTraining(5, 32, 0.5), plan, [], seed=rnd * 100 + i)
            replies.append(_reply(i, head_to_arrays(local), len(y)))
        if attackers:
            nan = {k: np.full_like(v.numpy(), np.nan) for k, v in arrays.items()}
            scaled = {k: v.numpy() * 100.0 for k, v in replies[0].content["arrays"].items()}
            replies += [_reply(97, _record(nan), 300), _reply(98, _record(scaled), 300)]
        strategy.current = {k: v.numpy() for k, v in arrays.items()}
        arrays, _ = strategy.aggregate_train(rnd, replies)
        if attackers:
            assert list(strategy.refused) == [97], "NaNs are refused before aggregation"
    load_head(head, arrays)
    return evaluate_head(head, *test).accuracy


def _reply(node: int, arrays: ArrayRecord, n: int) -> Message:
    content = RecordDict(
        {"arrays": arrays, "metrics": MetricRecord({"num-examples": n}), "site": ConfigRecord({"name": f"site-{node}"})}
    )
    return _message(content, f"r{node}", src=node, dst=0, reply_to="m")


def test_robust_aggregator_survives_nan_and_scaled_updates(digits_task: tuple) -> None:
    sites, test = digits_task
    clean = _federate(sites, test, "fedtrimmedavg", attackers=False)
    attacked = _federate(sites, test, "fedtrimmedavg", attackers=True)
    naive = _federate(sites, test, "fedavg", attackers=True)
    assert clean > 0.6
    assert attacked >= clean - 0.02, (clean, attacked)
    assert naive < clean - 0.1, "the scaled update must actually hurt a non-robust aggregator"


def test_run_config_exposes_the_robust_strategies() -> None:
    for name in ("fedmedian", "fedtrimmedavg"):
        cfg = config_from_dict({"train": {"strategy": name, "max_update_norm": 10.0, "protocol": "fedavg"}})
        assert type(make_strategy(cfg)).__name__.lower() == name
    assert RunConfig().train.max_update_norm is None
