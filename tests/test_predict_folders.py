"""`predict` on folders as users leave them, and a config file saved empty (issue 24, odd but ordinary data).

One unreadable image used to stop `predict` with nothing classified; tools' hidden files were
read as images; an empty config file silently ran the 30-round demo.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fedtransfer.cli.main import main
from fedtransfer.common.config.run import BackboneConfig
from fedtransfer.common.encoders.registry import load_encoder
from fedtransfer.common.model.head import make_head
from fedtransfer.server.export.model_file import export_model
from PIL import Image


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real exported model (MobileNetV2 at 32 px, an untrained two-class head)."""
    encoder = load_encoder(BackboneConfig(image_size=32), "cpu")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    return export_model(path, encoder, make_head(encoder.feature_dim, 2, 0), hidden=0, classes=["cat", "dog"])


def _pixels(shape: tuple[int, ...], dtype: type = np.uint8, high: int = 255) -> np.ndarray:
    return np.random.default_rng(0).integers(0, high, shape, dtype=dtype)


def _user_folder(root: Path) -> tuple[set[str], set[str]]:
    """A folder as a user leaves it; returns (images meant to be classified, files that must be named)."""
    (root / "cats").mkdir(parents=True)
    (root / "empty-class").mkdir()
    Image.fromarray(_pixels((40, 40, 3))).save(root / "cats" / "plain.png")
    Image.fromarray(_pixels((40, 40, 3))).save(root / "cats" / "SHOUTING.JPG")
    Image.fromarray(_pixels((40, 40, 4))).save(root / "cats" / "transparent.png")  # RGBA
    Image.fromarray(_pixels((40, 40), np.uint16, 65535)).save(root / "cats" / "scan16.png")  # 16-bit gray
    Image.fromarray(_pixels((40, 40, 3))).convert("P").save(root / "cats" / "palette.gif")
    Image.fromarray(_pixels((40, 40))).convert("1").save(root / "cats" / "bilevel.bmp")
    Image.fromarray(_pixels((40, 40, 3))).convert("CMYK").save(root / "cats" / "print.jpeg")
    Image.fromarray(_pixels((40, 40, 2))).save(root / "cats" / "gray-alpha.png")  # LA
    (root / "cats" / "truncated.jpg").write_bytes((root / "cats" / "SHOUTING.JPG").read_bytes()[:200])
    (root / "cats" / "gone.png").symlink_to(root / "nowhere.png")  # a link whose image was moved away
    elsewhere = root.parent / f"{root.name}-linked"
    elsewhere.mkdir()
    Image.fromarray(_pixels((40, 40, 3))).save(elsewhere / "linked.png")
    (root / "dogs").symlink_to(elsewhere, target_is_directory=True)  # a class folder linked in
    (root / "dogs" / "loop").symlink_to(root, target_is_directory=True)  # a link back up: no endless walk
    # what tools leave: never an image the user meant
    (root / ".ipynb_checkpoints").mkdir()
    Image.fromarray(_pixels((40, 40, 3))).save(root / ".ipynb_checkpoints" / "plain-checkpoint.png")
    (root / "cats" / "._plain.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (root / "__MACOSX").mkdir()
    (root / "__MACOSX" / "plain.png").write_bytes(b"\x00\x05\x16\x07")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    readable = {
        f"cats/{n}"
        for n in (
            "plain.png",
            "SHOUTING.JPG",
            "transparent.png",
            "scan16.png",
            "palette.gif",
            "bilevel.bmp",
            "print.jpeg",
            "gray-alpha.png",
        )
    }
    return readable | {"dogs/linked.png"}, {"cats/truncated.jpg", "cats/gone.png"}


def test_predict_classifies_every_readable_image_and_names_each_unreadable_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model_file: Path
) -> None:
    root = tmp_path / "photos"
    readable, unreadable = _user_folder(root)
    assert main(["predict", str(model_file), str(root)]) == 1
    out, err = capsys.readouterr()
    classified = {line.split("\t")[0]: line.split("\t")[1] for line in out.splitlines()}
    assert {str(Path(p).relative_to(root)) for p in classified} == readable
    assert set(classified.values()) <= {"cat", "dog"}
    lines = err.splitlines()
    assert len(lines) == len(unreadable) + 1, err
    for name in unreadable:
        assert sum(f"{root / name}: cannot read image" in line for line in lines) == 1, err
    assert lines[-1] == f"fedtransfer: 2 of {len(readable) + 2} images could not be read (named above)"


def test_predict_on_a_readable_folder_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model_file: Path
) -> None:
    (tmp_path / "a").mkdir()
    for k in range(3):
        Image.fromarray(_pixels((40, 40, 3))).save(tmp_path / "a" / f"{k}.png")
    assert main(["predict", str(model_file), str(tmp_path / "a")]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 3 and err == ""


def test_one_unreadable_image_given_by_name_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model_file: Path
) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["predict", str(model_file), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"fedtransfer: error: {bad}: cannot read image"), err


@pytest.mark.parametrize("text", ["", "\n   \n", "\t\n", "# settings to come\n"])
@pytest.mark.parametrize("command", [["simulate"], ["deploy", "run"]])
def test_an_empty_config_file_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, command: list[str]
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(text, encoding="utf-8")
    assert main([*command, "--config", str(config)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith(f"fedtransfer: error: {config}: holds no settings"), err
    assert not (tmp_path / "runs").exists()
