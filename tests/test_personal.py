"""A site's own model (personal:): trained once per round towards the global model, kept, never sent, DP if chosen."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fedtransfer.client.evaluate_round import evaluate
from fedtransfer.client.site import Site
from fedtransfer.client.site_model.personal import PersonalChoice, kept_by, personal_choice, personal_round
from fedtransfer.client.train_round import local_head
from fedtransfer.common.config.run import ConfigError, PersonalConfig, RunConfig, SitePolicy, load_site_config
from fedtransfer.common.config.site import SitePersonal
from fedtransfer.common.model.head import evaluate_head, make_head
from fedtransfer.common.privacy.evaluation import NAMES
from fedtransfer.common.storage.audit_log import read_records
from fedtransfer.common.wire.exchange import head_to_arrays
from fedtransfer.common.wire.protocol import Metric, Rec
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from tests.messages import to_site

DIM, CLASSES = 16, 4


def _site(tmp_path: Path, policy: SitePolicy | None = None) -> Site:
    """A site whose labels are skewed to class 0 (its own test split too): a global model misses that."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(CLASSES, DIM, generator=g)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.where(torch.rand(n, generator=g) < 0.7, 0, torch.randint(1, CLASSES, (n,), generator=g))
        return centres[y] + 1.5 * torch.randn(n, DIM, generator=g), y

    (train_x, train_y), (test_x, test_y) = split(400), split(200)
    encoder = SimpleNamespace(device=torch.device("cpu"), feature_dim=DIM, name="test-encoder", fingerprint="fp")
    data = SimpleNamespace(test=SimpleNamespace(classes=list(range(CLASSES))))
    return Site(
        "site-0",
        data,
        encoder,
        tmp_path,
        7,
        policy,
        None,
        train_x,
        train_y,
        test_x,
        test_y,  # type: ignore[arg-type]
        policy is None,
    )


def _message(server_round: int, arrays: ArrayRecord | None = None) -> Message:
    config = ConfigRecord({"server-round": server_round, "run-id": "r1", "backbone-fingerprint": "fp"})
    content = RecordDict({"config": config} if arrays is None else {"config": config, "arrays": arrays})
    return to_site(content, message_type="evaluate")


def _cfg(enabled: bool = True, **personal: object) -> RunConfig:
    cfg = RunConfig()
    return replace(
        cfg,
        train=replace(cfg.train, rounds=3, batch_size=50),
        personal=PersonalConfig(enabled=enabled, epochs=3, learning_rate=0.5, **personal),
    )


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
    assert torch.equal(
        torch.load(tmp_path / "personal" / "r1.pt", weights_only=True)["state"]["1.weight"], state["state"]["1.weight"]
    )
    assert len([r for r in read_records(site.audit_path) if r["event"] == "personal-trained"]) == 1
    personal_round(site, cfg, global_head, _message(2), "r1", 2)
    assert torch.load(tmp_path / "personal" / "r1.pt", weights_only=True)["round"] == 2
    assert again.accuracy > 0


@pytest.mark.parametrize(
    ("own", "run", "expected"),
    [
        (None, PersonalConfig(dp=True, target_epsilon=3.0), PersonalChoice(True, "run", 3.0, "run")),
        (SitePersonal(), PersonalConfig(dp=False), PersonalChoice(False, "run", None, None)),
        (SitePersonal(dp=True), PersonalConfig(dp=False, target_epsilon=5.0), PersonalChoice(True, "site", 5.0, "run")),
        (SitePersonal(dp=False), PersonalConfig(dp=True), PersonalChoice(False, "site", None, None)),
        (
            SitePersonal(target_epsilon=1.0),
            PersonalConfig(dp=True, target_epsilon=8.0),
            PersonalChoice(True, "run", 1.0, "site"),
        ),
        (SitePersonal(target_epsilon=1.0), PersonalConfig(dp=False), PersonalChoice(False, "run", None, None)),
        (
            SitePersonal(dp=True, target_epsilon=2.0),
            PersonalConfig(dp=False),
            PersonalChoice(True, "site", 2.0, "site"),
        ),
    ],
)
def test_the_sites_own_file_wins_over_the_run_config(
    own: SitePersonal | None, run: PersonalConfig, expected: PersonalChoice
) -> None:
    policy = None if own is None else SitePolicy(personal=own)  # None: simulation, the run config is the site's own
    assert personal_choice(policy, run) == expected


def test_a_site_that_requires_dp_gets_it_whatever_the_run_asks(tmp_path: Path) -> None:
    policy = SitePolicy(personal=SitePersonal(dp=True, target_epsilon=2.0))
    site, cfg = _site(tmp_path, policy), _cfg(dp=False, target_epsilon=8.0)
    personal_round(site, cfg, make_head(DIM, CLASSES), _message(1), "r1", 1)
    [trained] = [r for r in read_records(site.audit_path) if r["event"] == "personal-trained"]
    assert trained["dp_chosen"] is True and trained["dp_chosen_by"] == "site"
    assert trained["target_epsilon_chosen_by"] == "site" and trained["dp"]["target_epsilon"] == 2.0
    assert 0 < trained["epsilon"] <= 2.0 and (tmp_path / "personal-ledger.json").is_file()


def test_a_site_may_train_its_personal_model_without_noise_when_the_run_asks_for_dp(tmp_path: Path) -> None:
    site, cfg = _site(tmp_path, SitePolicy(personal=SitePersonal(dp=False))), _cfg(dp=True, target_epsilon=3.0)
    personal_round(site, cfg, make_head(DIM, CLASSES), _message(1), "r1", 1)
    [trained] = [r for r in read_records(site.audit_path) if r["event"] == "personal-trained"]
    assert trained["dp_chosen"] is False and trained["dp_chosen_by"] == "site" and trained["dp"] is None
    assert trained["epsilon"] is None and trained["target_epsilon_chosen_by"] is None
    assert not (tmp_path / "personal-ledger.json").exists()


def test_a_deployed_site_without_personal_keys_follows_the_run(tmp_path: Path) -> None:
    site, cfg = _site(tmp_path, SitePolicy()), _cfg(dp=True, target_epsilon=4.0)
    personal_round(site, cfg, make_head(DIM, CLASSES), _message(1), "r1", 1)
    [trained] = [r for r in read_records(site.audit_path) if r["event"] == "personal-trained"]
    assert (trained["dp_chosen"], trained["dp_chosen_by"], trained["target_epsilon_chosen_by"]) == (True, "run", "run")
    assert trained["dp"]["target_epsilon"] == 4.0


def _site_yaml(tmp_path: Path, personal: str) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(f"name: site-a\ndata_source: digits\npolicy:\n  max_epsilon: 8\n  personal:\n{personal}")
    return path


def test_the_site_file_carries_its_personal_choice(tmp_path: Path) -> None:
    site = load_site_config(_site_yaml(tmp_path, "    dp: true\n    target_epsilon: 1.5\n"))
    assert site.policy.personal == SitePersonal(dp=True, target_epsilon=1.5)
    assert load_site_config(_site_yaml(tmp_path, "    keep: false\n")).policy.personal == SitePersonal(keep=False)
    assert load_site_config(_site_yaml(tmp_path, "    {}\n")).policy.personal == SitePersonal()


@pytest.mark.parametrize(
    ("personal", "named"),
    [
        ("    dpp: true\n", "policy.personal.dpp: unknown key"),
        ("    dp: yes please\n", "policy.personal.dp: must be true or false"),
        ("    target_epsilon: 0\n", "policy.personal.target_epsilon: must be in (0, 100]"),
        ("    dp: false\n    target_epsilon: 2\n", "policy.personal.target_epsilon: is the budget of a DP-trained"),
        ("    - dp\n", "policy.personal: must be a mapping"),
        ("    keep: sometimes\n", "policy.personal.keep: must be true or false"),
        (
            "    keep: false\n    dp: true\n",
            "policy.personal.dp: says how the personal model trains, but policy.personal.keep is false",
        ),
        (
            "    keep: false\n    target_epsilon: 2\n",
            "policy.personal.target_epsilon: says how the personal model trains, but policy.personal.keep is false",
        ),
    ],
)
def test_a_bad_personal_key_is_one_line_naming_the_file_and_key(tmp_path: Path, personal: str, named: str) -> None:
    path = _site_yaml(tmp_path, personal)
    with pytest.raises(ConfigError) as err:
        load_site_config(path)
    assert str(err.value).startswith(f"{path}: {named}") and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("keep", "run_enabled", "expected"),
    [
        (None, True, (True, "run")),
        (None, False, (False, "run")),
        (False, True, (False, "site")),
        (True, False, (True, "site")),
        (True, True, (True, "site")),
    ],
)
def test_whether_a_personal_model_is_kept_is_the_sites_choice_where_its_file_says(
    keep: bool | None, run_enabled: bool, expected: tuple[bool, str]
) -> None:
    assert kept_by(SitePolicy(personal=SitePersonal(keep=keep)), PersonalConfig(enabled=run_enabled)) == expected
    assert kept_by(None, PersonalConfig(enabled=run_enabled)) == (run_enabled, "run")  # simulation: the run's


@pytest.mark.parametrize(("keep", "run_enabled"), [(False, True), (None, True), (True, False), (False, False)])
def test_a_site_that_keeps_no_personal_model_trains_stores_and_sends_none(
    tmp_path: Path, keep: bool | None, run_enabled: bool
) -> None:
    """Three evaluation messages answered by the handler itself: the final model, its record and report follow keep.

    Without DP the site's final model is chosen once, after the last round (3), and none of its scores is sent.
    """
    site, cfg = _site(tmp_path, SitePolicy(personal=SitePersonal(keep=keep))), _cfg(run_enabled, dp=False)
    kept = keep if keep is not None else run_enabled
    global_head = head_to_arrays(local_head(site, cfg, None, CLASSES))
    for rnd in (1, 2, 3):
        reply = evaluate(site, cfg, _message(rnd, global_head))
        assert set(reply[Rec.EVALUATION]) == set(NAMES)  # the global model's statistics always
        assert Metric.PERSONAL_ACCURACY not in reply.metric_records.get(Rec.METRICS, {})
    assert (tmp_path / "personal" / "r1.pt").is_file() is kept
    assert (tmp_path / "collaboration.json").is_file() is kept and (tmp_path / "collaboration.html").is_file() is kept
    records = read_records(site.audit_path)
    trained = [r for r in records if r["event"] == "personal-trained"]
    assert [r["round"] for r in trained] == ([3] if kept else [])
    assert all(r["keep_chosen_by"] == ("run" if keep is None else "site") and r["dp"] is None for r in trained)
    not_kept = [
        (r["round"], r["keep_chosen_by"], r["run_proposed"]) for r in records if r["event"] == "personal-not-kept"
    ]
    assert not_kept == ([(1, "site", run_enabled)] if keep is False else [])  # once per run, when the site declines


def test_with_dp_the_personal_model_is_trained_every_round_and_its_scores_stay_home(tmp_path: Path) -> None:
    """A site that chose DP for its personal model keeps its Ditto rounds, trained every round; no score leaves.

    Its scores on the test split would be a release of the test records no budget covers (issue 23).
    """
    site, cfg = _site(tmp_path), _cfg(dp=True, target_epsilon=8.0)
    global_head = head_to_arrays(local_head(site, cfg, None, CLASSES))
    for rnd in (1, 2):
        reply = evaluate(site, cfg, _message(rnd, global_head))
        sent = {k for r in reply.metric_records.values() for k in r}
        assert not {Metric.PERSONAL_ACCURACY, Metric.PERSONAL_BALANCED_ACCURACY} & sent
    trained = [r["round"] for r in read_records(site.audit_path) if r["event"] == "personal-trained"]
    assert trained == [1, 2]
    scored = [r for r in read_records(site.audit_path) if r["event"] == "personal-scored"]
    assert [r["round"] for r in scored] == [1, 2] and all(0 <= r["personal"] <= 1 for r in scored)
    assert not (tmp_path / "collaboration.json").exists()
