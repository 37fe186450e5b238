"""Per-person privacy at a deployed site: its own YAML names each record's person (user_column for text,
users_file for an image folder or a .npz, its schema copy's user: for a table), read by the simulation's readers;
a file or record that names nobody is one line naming the site's file, its key and the record."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fedtransfer.cli.main import main
from fedtransfer.client import train_round
from fedtransfer.client.site import Declined, Site, get_site
from fedtransfer.common.config.run import ConfigError, RunConfig, config_from_dict, load_site_config, to_run_config
from fedtransfer.common.config.site import site_paths
from fedtransfer.common.data.federation import deployed_site_data
from fedtransfer.common.data.sources import DataError
from fedtransfer.common.encoders.process_cache import ProcessCache
from fedtransfer.common.model.head import make_head
from fedtransfer.common.privacy.fedsgd import STATS_COUNTS
from fedtransfer.common.storage.audit_log import read_records
from fedtransfer.common.wire.protocol import RECORD_COUNTS, Metric
from fedtransfer.deploy.credentials import init_deployment
from flwr.app import Context, Message, RecordDict

from tests.messages import train_message
from tests.test_users import tiny_images  # the same tiny image folder the simulation's tests use

DIM = 8


def _run(tmp_path: Path, source: str = "npz", **privacy: object) -> RunConfig:
    """A coordinator's run config under unit: user (its data is its own hold-out; a deployed site reads its own)."""
    data = {"source": source} | ({"path": str(tmp_path / "server-test.npz")} if source == "npz" else {})
    train = {"protocol": "fedsgd", "sample_rate": 1.0, "rounds": 3}  # rate 1: the accountant's quick case
    return config_from_dict(
        {
            "output_dir": str(tmp_path / "run"),
            "cache_dir": str(tmp_path / "cache"),
            "device": "cpu",
            "backbone": {"image_size": 32},
            "train": train,
            "data": data,
            "privacy": {"unit": "user", "target_delta": 1e-3, "accountant": "rdp", "feature_stats": False} | privacy,
        }
    )


def _site_yaml(home: Path, **keys: object) -> Path:
    config = home / "site.yaml"
    config.write_text(yaml.safe_dump({"name": "hospital-a", "device": "cpu", "state_dir": "state"} | keys))
    return config


def _site(config: Path) -> Site:
    """The site a deployed ClientApp builds from `config`: its own data, random features for the encoder's."""
    sc = load_site_config(config)
    paths = site_paths(sc, config)
    data = deployed_site_data(sc, paths, 32)
    paths.state_dir.mkdir(exist_ok=True)

    class Backbone:
        name, fingerprint, feature_dim, device = "b", "f" * 64, DIM, torch.device("cpu")

    x, t = torch.randn(len(data.train), DIM), torch.randn(len(data.test), DIM)
    return Site(
        data.name,
        data,
        Backbone(),
        paths.state_dir,
        7,
        sc.policy,
        None,
        x,
        torch.from_numpy(data.train.labels),
        t,
        torch.from_numpy(data.test.labels),
    )


def _grouped_by_person(site: Site, cfg: RunConfig) -> int:
    """The site's sampling units, checked to be its people (one unit per person, every record in its person's)."""
    units, people = train_round.site_units(site, cfg), site.data.train.users
    assert people is not None and units.count == len(set(people)) < len(people)
    for k in range(len(people)):
        assert all((units.of_record[k] == units.of_record[j]) == (people[k] == people[j]) for j in range(len(people)))
    return units.count


def _npz(path: Path, count: int) -> None:
    images = np.arange(count * 64, dtype=np.int64).reshape(count, 8, 8) % 251
    np.savez(path, train_images=images.astype(np.uint8), train_labels=np.arange(count) % 2)


def test_an_image_folder_site_names_its_people_in_a_users_file_beside_its_config(tmp_path: Path) -> None:
    paths = tiny_images(tmp_path / "scans", 20)
    (tmp_path / "people").mkdir()
    (tmp_path / "people" / "users.csv").write_text(
        "path,user\n" + "".join(f"{p},patient-{k // 4}\n" for k, p in enumerate(paths))
    )
    config = _site_yaml(tmp_path, data_source="imagefolder", data_path="scans", users_file="people/users.csv")
    site = _site(config)
    assert _grouped_by_person(site, _run(tmp_path)) <= 5  # 5 patients of 4 scans each, some of them held out
    assert set(site.data.train.users) | set(site.data.test.users) == {f"patient-{k}" for k in range(5)}


def test_a_npz_site_takes_an_absolute_users_file_and_trains_per_person(tmp_path: Path) -> None:
    home, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    _npz(home / "scans.npz", 40)
    users = elsewhere / "users.csv"
    users.write_text("index,user\n" + "".join(f"{k},p{k % 8}\n" for k in range(40)))
    config = _site_yaml(
        home, data_source="npz", data_path="scans.npz", users_file=str(users), policy={"max_delta": 1e-2}
    )
    site, cfg = _site(config), _run(tmp_path)
    persons = _grouped_by_person(site, cfg)
    counts = train_round.train(site, cfg, _message(0, release=RECORD_COUNTS))  # per-person counts, noised
    released = max(float(counts["arrays"][STATS_COUNTS].numpy().astype(np.float64).sum()), 1.0)
    reply = train_round.train(site, cfg, _message(1))
    assert reply["metrics"][Metric.NUM_EXAMPLES] == pytest.approx(released, rel=1e-6)  # never the exact count
    [sent] = [r for r in read_records(site.audit_path) if r["event"] == "update-sent" and r["round"] == 1]
    assert sent["examples"] == persons  # the plan's n and the gradient sum count people, kept at the site


def test_a_text_site_names_its_people_in_a_user_column(tmp_path: Path) -> None:
    rows = "".join(f"note {k},{['fees', 'card'][k % 2]},customer-{k % 6}\n" for k in range(30))
    (tmp_path / "notes.csv").write_text("body,desk,customer\n" + rows)
    config = _site_yaml(
        tmp_path,
        data_source="text",
        data_path="notes.csv",
        text_column="body",
        label_column="desk",
        user_column="customer",
    )
    site = _site(config)
    assert _grouped_by_person(site, _run(tmp_path)) == 6
    assert all(u.startswith("customer-") for u in site.data.train.users)


def test_a_table_site_names_its_people_through_its_schema_copy(tmp_path: Path) -> None:
    schema = {
        "columns": {"balance": {"type": "numeric", "range": [0, 100]}},
        "label": {"column": "default", "classes": ["No", "Yes"]},
        "user": "customer",
    }
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(schema))
    rows = "".join(f"{k},{['No', 'Yes'][k % 2]},c{k // 5}\n" for k in range(40))
    (tmp_path / "cards.csv").write_text("balance,default,customer\n" + rows)
    config = _site_yaml(tmp_path, data_source="table", data_path="cards.csv", data_schema="schema.yaml")
    assert _grouped_by_person(_site(config), _run(tmp_path)) <= 8


def test_the_clientapp_builds_a_deployed_site_with_its_people(tmp_path: Path) -> None:
    """get_site, as each deployed ClientApp process calls it: the site's users file reaches its data."""
    _npz(tmp_path / "scans.npz", 30)
    (tmp_path / "users.csv").write_text("index,user\n" + "".join(f"{k},p{k // 3}\n" for k in range(30)))
    config = _site_yaml(tmp_path, data_source="npz", data_path="scans.npz", users_file="users.csv")
    cfg = _run(tmp_path)
    context = Context(
        run_id=1, node_id=7, node_config={"site-config": str(config)}, state=RecordDict(), run_config=to_run_config(cfg)
    )
    site = get_site(context, cfg, ProcessCache(max_entries=16, max_bytes=1 << 30))
    assert _grouped_by_person(site, cfg) <= 10


def test_a_sites_own_people_win_over_the_coordinators_synthetic_users(tmp_path: Path) -> None:
    """A coordinator evaluating on mnist groups records into synthetic users; a site whose data names its people
    samples and clips them (a real person split across synthetic users would not be protected as one)."""
    rows = "".join(f"note {k},{['fees', 'card'][k % 2]},c{k % 3}\n" for k in range(24))
    (tmp_path / "notes.csv").write_text("text,label,customer\n" + rows)
    site = _site(_site_yaml(tmp_path, data_source="text", data_path="notes.csv", user_column="customer"))
    assert _grouped_by_person(site, _run(tmp_path, "mnist", synthetic_users=2)) == 3


def test_a_site_that_names_nobody_declines_naming_the_key_to_set(tmp_path: Path) -> None:
    _npz(tmp_path / "scans.npz", 20)
    site = _site(_site_yaml(tmp_path, data_source="npz", data_path="scans.npz"))
    assert train_round.site_units(site, _run(tmp_path, unit="record")).count == len(site.train_y)
    with pytest.raises(
        Declined,
        match=r"names no person per record; set user_column \(text\) or users_file "
        r"\(imagefolder, npz\) in the site's config",
    ):
        train_round.site_units(site, _run(tmp_path))


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"data_source": "npz", "data_path": "x.npz", "user_column": "who"}, "user_column: names a column of a text"),
        ({"data_source": "text", "data_path": "x.csv", "users_file": "u.csv"}, "users_file: is a CSV naming each"),
        ({"data_source": "text", "data_path": "x.csv", "user_column": " "}, "user_column: names a column of a text"),
    ],
)
def test_a_person_key_for_another_source_is_one_line_naming_it(tmp_path: Path, keys: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"site\.yaml: {message}"):
        load_site_config(_site_yaml(tmp_path, **keys))


def test_a_record_the_users_file_does_not_name_is_one_line(tmp_path: Path) -> None:
    paths = tiny_images(tmp_path / "scans", 6)
    users = tmp_path / "users.csv"
    users.write_text("path,user\n" + "".join(f"{p},patient-{k}\n" for k, p in enumerate(paths[1:])))
    config = _site_yaml(tmp_path, data_source="imagefolder", data_path="scans", users_file="users.csv")
    with pytest.raises(DataError) as err:
        _site(config)
    assert str(err.value) == (
        f"{config}: users_file: {users}: no user for path '{paths[0]}'; every record needs "
        f"its person (add the line {paths[0]},USER)"
    )
    users.write_text("index,user\n")
    with pytest.raises(DataError, match=r"site\.yaml: users_file: .*users\.csv: the header must be path,user"):
        _site(config)


def test_a_text_record_without_its_person_or_an_unknown_column_is_one_line(tmp_path: Path) -> None:
    notes = tmp_path / "notes.csv"
    notes.write_text("text,label,customer\nlate fee,fees,c1\ncard lost,card,\n")
    config = _site_yaml(tmp_path, data_source="text", data_path="notes.csv", user_column="customer")
    with pytest.raises(DataError) as err:
        _site(config)
    assert str(err.value) == (
        f"{config}: user_column: {notes}: line 3: empty 'customer'; remove the record or fill it in"
    )
    wrong = _site_yaml(tmp_path, data_source="text", data_path="notes.csv", user_column="client")
    with pytest.raises(DataError, match=r"site\.yaml: user_column: .*notes\.csv: no column 'client' in the header"):
        _site(wrong)


def test_deploy_site_refuses_a_missing_users_file_before_connecting(tmp_path: Path, capsys) -> None:
    _npz(tmp_path / "scans.npz", 4)
    creds = init_deployment(tmp_path / "creds", ["hospital-a"], [])
    config = _site_yaml(tmp_path, data_source="npz", data_path="scans.npz", users_file="users.csv")
    code = main(["deploy", "site", "--config", str(config), "--credentials", str(creds.root), "--superlink", "h:1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "site.yaml: users_file: users.csv is not a file" in err, err


def _message(server_round: int, **extra: str) -> Message:
    return train_message(make_head(DIM, 2), server_round, **extra)  # a linear probe: the run has no feature statistics
