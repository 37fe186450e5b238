"""A site's own model (personal:): trained once per round towards the global model, kept, never sent, DP if chosen."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ConfigRecord, Message, Metadata, RecordDict

from client.personal import personal_round
from client.site import Site
from common.audit_log import read_records
from common.config import PersonalConfig, RunConfig
from common.head import evaluate_head, make_head

DIM, CLASSES = 16, 4


def _site(tmp_path: Path) -> Site:
    """A site whose labels are skewed to class 0 (its own test split too): a global model misses that."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(CLASSES, DIM, generator=g)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.where(torch.rand(n, generator=g) < 0.7, 0, torch.randint(1, CLASSES, (n,), generator=g))
        return centres[y] + 1.5 * torch.randn(n, DIM, generator=g), y

    (train_x, train_y), (test_x, test_y) = split(400), split(200)
    encoder = SimpleNamespace(device=torch.device("cpu"), feature_dim=DIM)
    return Site("site-0", None, encoder, tmp_path, 7, None, None, train_x, train_y, test_x, test_y, True)  # type: ignore[arg-type]


def _message(server_round: int) -> Message:
    meta = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="1",
                    created_at=time.time(), ttl=60.0, message_type="evaluate")  # fmt: skip
    return Message(content=RecordDict({"config": ConfigRecord({"server-round": server_round, "run-id": "r1"})}),
                   metadata=meta)  # fmt: skip


def _cfg(**personal: object) -> RunConfig:
    cfg = RunConfig()
    return replace(cfg, train=replace(cfg.train, rounds=3, batch_size=50),
                   personal=PersonalConfig(enabled=True, epochs=3, learning_rate=0.5, **personal))  # fmt: skip


@pytest.mark.parametrize("dp", [True, False])
def test_personal_model_learns_the_sites_skew_and_stays_home(tmp_path: Path, dp: bool) -> None:
    site, cfg = _site(tmp_path), _cfg(dp=dp, target_epsilon=8.0)
    torch.manual_seed(0)
    global_head = make_head(DIM, CLASSES)  # untrained: what a global model knows of this site's skew
    before = evaluate_head(global_head, site.test_x, site.test_y).accuracy
    scores = personal_round(site, cfg, global_head, _message(1), "r1", 1)
    assert scores.accuracy > before + 0.2
    kept = tmp_path / "personal" / "r1.pt"
    assert kept.is_file()
    [trained] = [r for r in read_records(site.audit_path) if r["event"] == "personal-trained"]
    assert trained["dp_chosen"] is dp and (trained["dp"] is not None) is dp
    if dp:
        assert 0 < trained["epsilon"] <= 8.0 and (tmp_path / "personal-ledger.json").is_file()
    assert not any(r["event"] == "update-sent" for r in read_records(site.audit_path))  # nothing was sent


def test_a_round_trains_once_and_the_model_carries_over(tmp_path: Path) -> None:
    site, cfg = _site(tmp_path), _cfg(dp=True, target_epsilon=8.0)
    global_head = make_head(DIM, CLASSES)
    personal_round(site, cfg, global_head, _message(1), "r1", 1)
    state = torch.load(tmp_path / "personal" / "r1.pt", weights_only=True)
    again = personal_round(site, cfg, global_head, _message(1), "r1", 1)  # a repeated evaluation of round 1
    assert torch.equal(torch.load(tmp_path / "personal" / "r1.pt", weights_only=True)["state"]["1.weight"],
                       state["state"]["1.weight"])  # fmt: skip
    assert len([r for r in read_records(site.audit_path) if r["event"] == "personal-trained"]) == 1
    personal_round(site, cfg, global_head, _message(2), "r1", 2)
    assert torch.load(tmp_path / "personal" / "r1.pt", weights_only=True)["round"] == 2
    assert again.accuracy > 0
