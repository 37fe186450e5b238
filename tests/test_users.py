"""Per-person privacy on real data (privacy.unit: user): a table's user column, a text file's user column, and
the users file of an image folder or a .npz name each record's person; every record must have one."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fedtransfer.cli.main import main
from fedtransfer.client import train_round
from fedtransfer.client.site import Declined, Site
from fedtransfer.common.config.run import config_from_dict
from fedtransfer.common.data.federation import federation_for, simulate_federation
from fedtransfer.common.data.sources import DataError, SiteData, load_source
from fedtransfer.common.model.head import make_head
from fedtransfer.common.storage.audit_log import read_records
from fedtransfer.common.wire.protocol import FEATURE_STATS, DPRecord, Metric
from fedtransfer.server.audit.empirical_replay import canary_units
from flwr.app import Message
from PIL import Image

from tests.messages import train_message

DIM = 16
SCHEMA = {
    "columns": {"balance": {"type": "numeric", "range": [0, 100]}},
    "label": {"column": "default", "classes": ["No", "Yes"]},
    "user": "customer",
}


def _table(tmp_path: Path, users: list[str], schema: dict = SCHEMA) -> tuple[Path, Path]:
    """A schema file and a CSV of one row per entry of `users` (a customer's several card statements)."""
    schema_path, table = tmp_path / "schema.yaml", tmp_path / "cards.csv"
    schema_path.write_text(yaml.safe_dump(schema))
    with table.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["balance", "default", "customer"])
        out.writerows([[k % 100, ["No", "Yes"][k % 2], user] for k, user in enumerate(users)])
    return schema_path, table


def _table_config(schema: Path, table: Path, tmp_path: Path, **privacy: object) -> dict:
    return {
        "output_dir": str(tmp_path / "run"),
        "cache_dir": str(tmp_path / "cache"),
        "backbone": {"name": "tabular", "schema": str(schema)},
        "data": {"source": "table", "path": str(table), "split": "iid", "num_sites": 2},
        "train": {"protocol": "fedsgd", "rounds": 3, "sample_rate": 0.5},
        # rdp: these tests check who counts as a unit, not the accountant; PRV's calibration took 40 of their 46 s
        "privacy": {"unit": "user", "feature_stats": True, "target_delta": 1e-3, "accountant": "rdp"} | privacy,
    }


def _message(server_round: int, **extra: str) -> Message:
    return train_message(make_head(DIM, 2, centred=True), server_round, **extra)


def _site(data: SiteData, tmp_path: Path) -> Site:
    """The site holding `data`, with random features standing in for the encoder's."""
    n, m = len(data.train), len(data.test)
    x, t = torch.randn(n, DIM, generator=torch.Generator().manual_seed(0)), torch.randn(m, DIM)

    class Backbone:
        name, fingerprint, feature_dim, device = "b", "f" * 64, DIM, torch.device("cpu")

    (tmp_path / "site").mkdir(exist_ok=True)
    return Site(
        data.name,
        data,
        Backbone(),
        tmp_path / "site",
        7,
        None,
        None,
        x,
        torch.from_numpy(data.train.labels),
        t,
        torch.from_numpy(data.test.labels),
    )


def test_table_with_repeated_users_trains_per_user(tmp_path: Path) -> None:
    people = [f"c{k // 8}" for k in range(240)]  # 30 customers, 8 rows each
    cfg = config_from_dict(_table_config(*_table(tmp_path, people), tmp_path))
    data = federation_for(cfg).sites[0]
    assert data.train.users is not None and len(data.train.users) == len(data.train)
    persons = len(set(data.train.users))
    assert persons < len(data.train)  # repeated users: fewer persons than records
    site = _site(data, tmp_path)
    stats = train_round.train(site, cfg, _message(0, release=FEATURE_STATS))
    released = stats["metrics"][Metric.NUM_EXAMPLES]  # the noisy count of people round 0 released, not rows
    assert released != persons and abs(released - persons) < abs(released - len(data.train))
    reply = train_round.train(site, cfg, _message(1))
    assert reply["metrics"][Metric.NUM_EXAMPLES] == released  # the released count stands in for the exact one
    assert reply["metrics"][Metric.EXPECTED_BATCH] == pytest.approx(0.5 * released)
    assert DPRecord.from_mapping(reply["dp"]).sample_rate == 0.5
    sent = [r for r in read_records(site.audit_path) if r["event"] == "update-sent"]
    assert [r["examples"] for r in sent] == [persons, persons]  # the plan's n counts people, kept at the site


def test_delta_is_checked_against_the_number_of_people_not_rows(tmp_path: Path) -> None:
    """δ < 1/n with n the people: δ = 0.02 is below 1/30 (a site's at most 30 people) but not 1/86 (its rows)."""
    people = [f"c{k // 8}" for k in range(240)]
    raw = _table_config(*_table(tmp_path, people), tmp_path, target_delta=0.02)
    cfg = config_from_dict(raw)
    site = _site(federation_for(cfg).sites[0], tmp_path)
    assert train_round.train(site, cfg, _message(0, release=FEATURE_STATS))["metrics"][Metric.NUM_EXAMPLES] <= 30
    records = config_from_dict(raw | {"privacy": raw["privacy"] | {"unit": "record"}})
    with pytest.raises(Declined, match=r"must be below 1/n for this site's n training samples") as refused:
        train_round.train(site, records, _message(0, release=FEATURE_STATS, **{"run-id": "r2"}))
    # the refusal goes to the coordinator: it names no count of the site's (an exact count is private)
    n = len(site.train_y)
    assert not re.search(rf"\b({n}|{1 / n:.3g})\b", str(refused.value))


@pytest.mark.refused_before_flower
def test_a_row_without_its_user_is_one_line_naming_file_and_line(tmp_path: Path, capsys) -> None:
    schema, table = _table(tmp_path, ["a", "a", "b", "", "c"])
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_table_config(schema, table, tmp_path)))
    assert main(["simulate", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(table) in err and "line 5 column customer" in err and "no user" in err


def test_user_column_is_never_a_feature(tmp_path: Path) -> None:
    schema, table = _table(tmp_path, ["a", "b", "c", "d"])
    with_users = load_source("table", str(table), 32, str(schema))
    plain = tmp_path / "plain"
    plain.mkdir()
    plain_schema, _ = _table(plain, ["a"], {k: v for k, v in SCHEMA.items() if k != "user"})
    assert with_users.inputs.shape[1] == 1  # only balance is coded
    assert list(with_users.users) == ["a", "b", "c", "d"]
    with pytest.raises(DataError, match="extra columns 'customer'"):
        load_source("table", str(table), 32, str(plain_schema))


@pytest.mark.refused_before_flower
def test_a_table_schema_without_a_user_column_is_refused_before_flower(tmp_path: Path, capsys) -> None:
    without = {k: v for k, v in SCHEMA.items() if k != "user"}
    schema, _ = _table(tmp_path, [], without)
    table = tmp_path / "plain.csv"
    # 60 rows: sites above data.min_site_records, so the missing person column is what is refused
    table.write_text("balance,default\n" + "".join(f"{k},No\n{k},Yes\n" for k in range(30)))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_table_config(schema, table, tmp_path)))
    assert main(["simulate", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "names no person per record" in err and str(schema) in err


def test_text_user_column(tmp_path: Path) -> None:
    texts = tmp_path / "notes.jsonl"
    texts.write_text(
        '{"text": "late fee", "label": "fees", "user": 17}\n{"text": "card lost", "label": "card", "user": "u-2"}\n'
    )
    samples = load_source("text", str(texts), 32, columns=("text", "label"), users="user")
    assert list(samples.users) == ["17", "u-2"]
    texts.write_text('{"text": "late fee", "label": "fees", "user": ""}\n')
    with pytest.raises(DataError, match=r"notes.jsonl: line 1: empty 'user'"):
        load_source("text", str(texts), 32, columns=("text", "label"), users="user")


def tiny_images(root: Path, count: int) -> list[str]:
    """`count` tiny PNGs under root/<class>/, and their paths relative to root."""
    paths = []
    for k in range(count):
        file = root / f"class{k % 2}" / f"{k}.png"
        file.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), k * 10, np.uint8)).save(file)
        paths.append(file.relative_to(root).as_posix())
    return paths


def test_image_folder_users_file(tmp_path: Path) -> None:
    root = tmp_path / "scans"
    paths = tiny_images(root, 6)
    users = tmp_path / "users.csv"
    users.write_text("path,user\n" + "".join(f"{p},patient-{k // 2}\n" for k, p in enumerate(paths)))
    samples = load_source("imagefolder", str(root), 32, users=str(users))
    assert sorted(samples.users) == sorted(f"patient-{k // 2}" for k in range(6))
    assert len(set(samples.user_codes())) == 3
    users.write_text("path,user\n" + "".join(f"{p},patient-{k // 2}\n" for k, p in enumerate(paths[1:])))
    with pytest.raises(DataError, match=rf"users.csv: no user for path '{paths[0]}'"):
        load_source("imagefolder", str(root), 32, users=str(users))


def test_image_folders_per_site_take_paths_relative_to_data_path(tmp_path: Path) -> None:
    root = tmp_path / "sites"
    lines = [
        f"{site}/{p},{site}-person-{k % 3}" for site in ("a", "b") for k, p in enumerate(tiny_images(root / site, 6))
    ]
    users = tmp_path / "users.csv"
    users.write_text("path,user\n" + "\n".join(lines) + "\n")
    fed = simulate_federation("imagefolder", str(root), "folders", 2, 0.5, 0.2, 0.1, 32, 0, users=str(users))
    for site in fed.sites:
        assert all(u.startswith(f"{site.name}-person-") for u in site.train.users)


def test_npz_users_file(tmp_path: Path) -> None:
    archive = tmp_path / "med.npz"
    parts = {f"{s}_images": np.zeros((n, 8, 8), np.uint8) for s, n in (("train", 4), ("val", 2), ("test", 2))}
    np.savez(archive, **parts, **{f"{s}_labels": np.arange(n) % 2 for s, n in (("train", 4), ("val", 2), ("test", 2))})
    users = tmp_path / "users.csv"
    users.write_text("index,user\n" + "".join(f"{k},p{k % 3}\n" for k in range(8)))
    samples = load_source("npz", str(archive), 32, users=str(users))
    assert list(samples.users) == [f"p{k % 3}" for k in range(8)]
    users.write_text("index,user\n0,p0\n0,p1\n")
    with pytest.raises(DataError, match=r"users\.csv: line 3: index '0' is listed twice"):
        load_source("npz", str(archive), 32, users=str(users))
    users.write_text("index,user\n" + "".join(f"{k},p{k}\n" for k in range(7)))
    with pytest.raises(DataError, match=r"users\.csv: no user for index '7'"):
        load_source("npz", str(archive), 32, users=str(users))


def test_canary_audit_groups_the_real_records_by_their_people() -> None:
    cfg = config_from_dict(
        {
            "data": {"source": "table", "path": "x.csv"},
            "backbone": {"name": "tabular", "schema": "s.yaml"},
            "train": {"protocol": "fedsgd"},
            "privacy": {"unit": "user"},
        }
    )
    units = canary_units(6, 9, cfg, np.array([0, 0, 1, 1, 2, 2]))
    assert units.count == 3 + 3  # three people, then each canary a person of its own


def test_per_person_table_run_on_the_simulation_engine(tmp_path: Path, capsys) -> None:
    """unit: user end to end: privacy.json counts each site's people (not rows) in every round, round 0 included,
    and the audit recomputes every site's ε from its log and passes."""
    import json

    people = [f"c{k // 6}" for k in range(300)]  # 50 customers, 6 statements each
    raw = _table_config(*_table(tmp_path, people), tmp_path)
    raw["train"] |= {"rounds": 2}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["simulate", "--config", str(config)]) == 0, capsys.readouterr()
    fed = federation_for(config_from_dict(raw))
    privacy = json.loads((tmp_path / "run" / "privacy.json").read_text())["sites"]
    for site in fed.sites:
        rounds = privacy[site.name]["per_round"]
        assert [r["release"] for r in rounds] == [FEATURE_STATS, "training", "training"]
        people, rows = len(set(site.train.users)), len(site.train)
        # the site's released (noisy) count of its people, never the exact one, nor its rows
        assert all(r["num_examples"] != people and abs(r["num_examples"] - people) < rows - people for r in rounds)
    assert main(["audit", str(tmp_path / "run"), "--report-dir", str(tmp_path / "audit")]) == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("path,user\na.png,ann\n".encode("utf-16"), "not UTF-8 text"),
        (b'path,user\n"a.png"x,ann\n', "not a valid CSV file"),
        (b"path,person\na.png,ann\n", "the header must be path,user"),
        (b"path,user\na.png,\n", "line 2: needs path,user with both filled in"),
        (b"path,user\na.png,ann\na.png,bob\n", "line 3: path 'a.png' is listed twice"),
        (None, "cannot read the users file"),
    ],
)
def test_a_bad_users_file_is_one_line_naming_it(tmp_path: Path, content: bytes | None, message: str) -> None:
    from fedtransfer.common.data.files import DataError, read_user_map

    path = tmp_path / "users.csv"
    if content is None:
        path.mkdir()  # a folder where the file should be: the open fails
    else:
        path.write_bytes(content)
    with pytest.raises(DataError) as err:
        read_user_map(path, "path")
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value) and "\n" not in str(err.value)
