"""The `fedtransfer` command line: user errors are one line and exit 2, found before any Flower process starts;
the console shows one line per round."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fedtransfer.cli.main import main
from fedtransfer.common.config.run import BackboneConfig
from fedtransfer.common.encoders.registry import load_encoder
from fedtransfer.common.model.head import make_head
from fedtransfer.server.export.model_file import export_model
from fedtransfer.server.federation.console import ConsoleFilter, round_summary
from PIL import Image


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], *expected: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("fedtransfer: error: "), err
    assert all(text in err for text in expected), err
    return err


def _read_only_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write in (root ignores modes, so it gets a read-only system folder)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys/kernel")):
        try:
            tempfile.TemporaryFile(dir=candidate).close()
        except OSError:
            return candidate
    pytest.skip("no folder here refuses writes to this user")


def _config(tmp_path: Path, **keys: object) -> str:
    raw = {
        "output_dir": str(tmp_path / "run"),
        "cache_dir": str(tmp_path / "cache"),
        "data": {"source": "digits", "num_sites": 2},
    } | keys
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize("command", [["simulate"], ["deploy", "run"]])
@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("output-is-a-file", ("output_dir: ", "is a file, not a folder")),
        ("output-under-a-file", ("output_dir: cannot create", "Not a directory")),
        ("output-read-only", ("output_dir: cannot write in",)),
        ("cache-read-only", ("cache_dir: cannot write in",)),
        ("data-missing", ("no-such.npz: no such .npz file",)),
        ("sites-vs-folders", ("holds 2 site folders, but data.num_sites is 3",)),
    ],
)
def test_run_commands_refuse_bad_paths_and_data_before_flower_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str], case: str, expected: tuple[str, ...]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    folders = tmp_path / "sites"
    for site in ("x", "y"):
        (folders / site / "0").mkdir(parents=True)
    if case == "output-is-a-file":
        keys: dict[str, object] = {"output_dir": str(blocker)}
    elif case == "output-under-a-file":
        keys = {"output_dir": str(blocker / "run")}
    elif case == "output-read-only":
        keys = {"output_dir": str(_read_only_folder(tmp_path))}
    elif case == "cache-read-only":
        keys = {"cache_dir": str(_read_only_folder(tmp_path))}
    elif case == "data-missing":
        keys = {"data": {"source": "npz", "path": str(tmp_path / "no-such.npz")}}
    else:
        keys = {"data": {"source": "imagefolder", "path": str(folders), "split": "folders", "num_sites": 3}}
    started = time.monotonic()
    _one_line_error(capsys, [*command, "--config", _config(tmp_path, **keys)], *expected)
    assert time.monotonic() - started < 20  # no SuperLink, no Ray: the run never got that far
    assert not (tmp_path / "run" / "superlink.log").exists() and not (tmp_path / "run" / "run.log").exists()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real exported model (MobileNetV2 at 32 px, an untrained two-class head)."""
    encoder = load_encoder(BackboneConfig(image_size=32), "cpu")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    return export_model(path, encoder, make_head(encoder.feature_dim, 2, 0), hidden=0, classes=["cat", "dog"])


def _png(path: Path, size: int = 40) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def test_predict_classifies_images_and_refuses_bad_model_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model_file: Path
) -> None:
    image = _png(tmp_path / "one.png")
    assert main(["predict", str(model_file), str(image)]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.split("\t")[0] == str(image) and line.split("\t")[1] in {"cat", "dog"}

    _one_line_error(capsys, ["predict", str(tmp_path / "missing.pt"), str(image)], "missing.pt: no such model file")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    _one_line_error(capsys, ["predict", str(truncated), str(image)], "truncated.pt: ")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    _one_line_error(capsys, ["predict", str(foreign), str(image)], "foreign.pt: not a fedtransfer model file")
    _one_line_error(capsys, ["predict", str(model_file), str(tmp_path / "nothing")], "nothing: no such file or folder")
    (tmp_path / "empty").mkdir()
    _one_line_error(capsys, ["predict", str(model_file), str(tmp_path / "empty")], "empty: no images found")


@pytest.mark.parametrize("limit", [1_000, 1_500])  # past 2 x the limit PIL raises; past the limit it only warns
def test_predict_refuses_an_image_past_the_decompression_bomb_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model_file: Path, monkeypatch: pytest.MonkeyPatch, limit: int
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    bomb = _png(tmp_path / "bomb.png", size=40)  # 1,600 pixels
    _one_line_error(capsys, ["predict", str(model_file), str(bomb)], "bomb.png: more pixels than PIL's")


def test_console_shows_one_line_per_round_and_every_warning_once() -> None:
    """The lines `flwr run --stream` printed for a 2-round demo (shortened), in the order they came."""
    rounds = [
        round_summary(
            r,
            2,
            trained=4,
            asked=4,
            server_accuracy=0.5 + r / 10,
            sites_accuracy=0.5,
            epsilon_max=1.0 * r,
            target_epsilon=3.0,
            seconds=1.2,
        )
        for r in (1, 2)
    ]
    coloured, stamped = "\x1b[92mINFO \x1b[0m:      {}", "11/25/2026 17:42:50:INFO:{}"
    warn = "round 2: site site-1 did not reply (dropped out): Node Unavailable"
    stream = [
        "Successfully started run 9445198260572399087",
        coloured.format("Starting Flower Simulation"),
        "\x1b[93mWARNING \x1b[0m:   Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.",
        "11/25/2026 17:42:24:DEBUG:Initialising: RayBackend",
        "/venv/lib/python3.11/site-packages/ray/_private/worker.py:2051: FutureWarning: Tip: ...",
        "  warnings.warn(",
        coloured.format("Run 73734833fc2e: mobilenet_v2 (1412499855a3), 10 classes, 2 rounds"),
        stamped.format("Run 73734833fc2e: mobilenet_v2 (1412499855a3), 10 classes, 2 rounds"),
        coloured.format("configure_train: Sampled 4 nodes (out of 4)"),
        stamped.format("configure_train: Sampled 4 nodes (out of 4)"),
        coloured.format(rounds[0]),
        stamped.format(rounds[0]),
        f"\x1b[93mWARNING \x1b[0m:   {warn}",
        f"11/25/2026 17:42:51:WARNING:{warn}",
        coloured.format(rounds[1]),
        stamped.format(rounds[1]),
        coloured.format("Run 73734833fc2e finished: server hold-out accuracy 0.7980"),
        "11/25/2026 17:42:55:DEBUG:ServerApp finished running.",
    ]
    console = ConsoleFilter()
    shown = [text for line in stream if (text := console.show(line)) is not None]
    assert shown == [
        "Run 73734833fc2e: mobilenet_v2 (1412499855a3), 10 classes, 2 rounds",
        rounds[0],
        f"WARNING: {warn}",
        rounds[1],
    ]
    assert (
        rounds[1] == "round 2/2 | sites trained 4/4 | server acc 0.7000 | sites' acc 0.5000 | ε spent max 2.000 "
        "(target 3) | 1.2s"
    )
    verbose = ConsoleFilter(verbose=True)
    assert [verbose.show(line) for line in stream] == stream


def test_no_private_entry_points_beside_the_command() -> None:
    """One command line: no module of the project runs as a program of its own except `python -m fedtransfer.cli`."""
    root = Path(__file__).resolve().parent.parent
    own = [p for package in ("cli", "server", "client", "common", "deploy") for p in (root / package).rglob("*.py")]
    mains = [p.relative_to(root) for p in own if 'if __name__ == "__main__"' in p.read_text(encoding="utf-8")]
    assert mains == []
    assert os.path.isfile(root / "cli" / "__main__.py")


_FAKE_FLWR = """\
import json, sys, tomllib
from pathlib import Path

cfg = tomllib.loads(Path(sys.argv[sys.argv.index("--run-config") + 1]).read_text())
print("Successfully started run 4242", flush=True)
print("\\x1b[92mINFO \\x1b[0m:      configure_train: Sampled 2 nodes (out of 2)", flush=True)
print("\\x1b[92mINFO \\x1b[0m:      round 1/1 | sites trained 2/2 | server acc 0.5 | sites' acc - | x", flush=True)
status = {"status": "completed", "run_id": "abc", "final_accuracy": 0.5}
if cfg["run_name"] == "fails":
    status = {"status": "failed", "run_id": "abc", "reason": "round(s) [1] did not aggregate"}
Path(cfg["output_dir"], "status.json").write_text(json.dumps(status))
"""


@pytest.mark.parametrize("outcome", ["completed", "fails"])
def test_launcher_keeps_the_whole_log_and_reads_the_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], outcome: str
) -> None:
    """`submit_run` against a stand-in `flwr`: Flower's run id, run.log, one console line, status.json's verdict."""
    import sys

    from fedtransfer.common.config.run import config_from_dict
    from fedtransfer.server.launch import launcher

    fake = tmp_path / "flwr"
    fake.write_text(f"#!{sys.executable}\n{_FAKE_FLWR}")
    fake.chmod(0o755)
    monkeypatch.setattr(launcher, "flower_bin", lambda _name: str(fake))
    cfg = config_from_dict({"run_name": outcome, "output_dir": str(tmp_path / "run")})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "status.json").write_text('{"status": "completed"}')  # an earlier run's verdict
    if outcome == "completed":
        done = launcher.submit_run(cfg, "conn", env=launcher.flower_env(), app_dir=tmp_path)
        assert done.flower_run_id == 4242 and done.status["run_id"] == "abc"
    else:
        failed = r"run abc FAILED: .*did not aggregate; no model exported; see .*run\.log"
        with pytest.raises(launcher.RunFailed, match=failed):
            launcher.submit_run(cfg, "conn", env=launcher.flower_env(), app_dir=tmp_path)
    assert capsys.readouterr().out.splitlines() == ["round 1/1 | sites trained 2/2 | server acc 0.5 | sites' acc - | x"]
    assert "configure_train" in (tmp_path / "run" / "run.log").read_text()
