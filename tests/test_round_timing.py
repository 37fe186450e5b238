"""Where a deployed round's time goes, per site, from what the server observes (server/federation/timing.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from fedtransfer.common.config.run import RunConfig
from fedtransfer.common.wire.protocol import Rec, site_record
from fedtransfer.server.federation import timing
from fedtransfer.server.federation.recorder import RunRecorder
from fedtransfer.server.federation.sites import send_and_receive
from flwr.app import Message, Metadata, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID

SLOW_PULLS = 4  # the slow site's reply comes with the server's 4th pull


def _metadata(message_id: str, src: int, dst: int, reply_to: str = "", created_at: float | None = None) -> Metadata:
    return Metadata(
        run_id=1,
        message_id=message_id,
        src_node_id=src,
        dst_node_id=dst,
        reply_to_message_id=reply_to,
        group_id="1",
        created_at=time.time() if created_at is None else created_at,
        ttl=600.0,
        message_type="train",
    )


class _Grid:
    """Site `fast` (node 1) replies by the first pull; `slow` (node 2) builds its reply late, by the 4th."""

    def __init__(self) -> None:
        self.pulls = 0

    def push_messages(self, messages: list[Message]) -> list[str]:
        time.sleep(0.02)  # the push itself takes a while
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids: set[str]) -> list[Message]:
        self.pulls += 1
        out = []
        for node, name in ((1, "fast"), (2, "slow")):
            if f"m-{node}" in ids and (node == 1 or self.pulls == SLOW_PULLS):
                meta = _metadata(f"r-{node}", node, SUPERLINK_NODE_ID, f"m-{node}", created_at=time.time() - 0.01)
                out.append(Message(content=RecordDict({Rec.SITE: site_record(name)}), metadata=meta))
        return out


def _exchange() -> list[Message]:
    asked = [Message(content=RecordDict(), metadata=_metadata(f"m-{n}", SUPERLINK_NODE_ID, n)) for n in (1, 2)]
    timing.take({})  # notes another test left
    return send_and_receive(_Grid(), asked, timeout=30.0)  # type: ignore[arg-type]


def test_each_sites_round_trip_splits_into_pickup_work_and_reply() -> None:
    assert len(_exchange()) == 2
    (exchange,) = timing.take({"fast": 0.001, "slow": 0.002})
    assert exchange["kind"] == "train" and exchange["push_s"] >= 0.02
    fast, slow = exchange["sites"]["fast"], exchange["sites"]["slow"]
    assert slow["roundtrip_s"] > fast["roundtrip_s"] + 0.1  # three pull pauses (0.05, 0.075, 0.1125 s) later
    for part in (fast, slow):
        assert part["work_s"] in (0.001, 0.002)  # what the site released, nothing finer
        assert part["pickup_s"] == pytest.approx(part["at_site_s"] - part["work_s"], abs=0.002)
        assert part["at_site_s"] + part["reply_s"] == pytest.approx(part["roundtrip_s"], abs=0.002)
        assert 0.0 <= part["reply_s"] < 0.05  # built 10 ms before the pull that brought it
    assert timing.take({}) == []  # taken once: the next round starts afresh


def test_status_json_names_the_slowest_site_with_its_median_parts(tmp_path: Path) -> None:
    _exchange()
    lines = [{"round": r, "aggregated": True, "server": {"accuracy": 0.5}, "sites": {}} for r in (1, 2, 3)]
    for line in lines:
        _exchange()
        line["timing"] = timing.take({"fast": 0.001, "slow": 0.002})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = RunRecorder(RunConfig(output_dir=str(tmp_path)), "r1", {}).finish(
        {"w": np.zeros(2, dtype=np.float32)}, 0.5, None, "not under test"
    )
    where = summary["timing"]
    assert where["slowest_site"] == "slow"
    assert set(where["sites"]) == {"fast", "slow"}
    assert set(where["sites"]["slow"]) == {"roundtrip_s", "at_site_s", "reply_s", "pickup_s", "work_s"}
    assert where["sites"]["slow"]["work_s"] == 0.002 and where["push_s"] >= 0.02
    assert json.loads((tmp_path / "status.json").read_text())["timing"] == where
