"""Tabular encoder: declared, public preprocessing of table rows behind the `Encoder` interface.

A row reaches the encoder "coded" by the loader (common/data/tables.py): one float64 per declared
column, in schema order; a numeric column holds its value, a categorical column the index of its
category in the declared list (the list's length for "other"), and NaN marks a missing cell. The
encoder applies each column's missing-value rule, clips numbers to their declared range and maps
them to (x - center) / scale, one-hot encodes categories with an "other" slot, appends a constant 1
and, optionally, random Fourier features. Every parameter comes from the schema (describe()), none
from the data, so the features cost no privacy. The constant 1 keeps every linear decision
boundary of the preprocessed row intact under the head's per-sample L2 normalisation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from fedtransfer.common.config.run import BackboneConfig
from fedtransfer.common.data.table_schema import NumericColumn, TableSchema, load_schema, schema_from_dict
from fedtransfer.common.encoders.interface import EncoderError, encoder_fingerprint

CODING = "fedtransfer-table/1"  # how loaders code rows for embed(); part of describe(), so of every cache key
RF_WEIGHT, RF_BIAS = "random_features.weight", "random_features.bias"


def random_feature_state(schema: TableSchema) -> dict[str, torch.Tensor]:
    """The fixed random projection (seeded, independent of any data); empty without random_features."""
    rf = schema.random_features
    if rf is None:
        return {}
    rng = np.random.default_rng(rf.seed)
    weight = rng.standard_normal((schema.base_dim, rf.dim)) / rf.lengthscale
    bias = rng.uniform(0.0, 2 * math.pi, rf.dim)
    return {RF_WEIGHT: torch.from_numpy(weight).float(), RF_BIAS: torch.from_numpy(bias).float()}


def preprocess(schema: TableSchema, coded: np.ndarray) -> np.ndarray:
    """Coded rows (N, columns) to the preprocessed rows (N, base_dim), float64; see the module docstring."""
    parts = []
    for j, column in enumerate(schema.columns):
        values = coded[:, j]
        missing = np.isnan(values)
        if missing.any() and column.missing == "error":
            raise EncoderError(f"column {column.name}: a missing value, and its declared rule is missing: error")
        if isinstance(column, NumericColumn):
            filled = np.clip(np.where(missing, column.fill or 0.0, values), column.low, column.high)
            parts.append(((filled - column.center) / column.scale)[:, None])
            if column.missing == "indicator":
                parts.append(missing[:, None].astype(np.float64))
            continue
        other = len(column.categories)
        fill = other if column.fill is None else column.categories.index(column.fill)
        index = np.where(missing, fill, values)
        if ((index < 0) | (index > other) | (index != np.round(index))).any():
            raise EncoderError(f"column {column.name}: a coded category outside 0..{other}; code rows with the loader")
        parts.append(np.eye(other + 1)[index.astype(np.int64)])
    parts.append(np.ones((len(coded), 1)))
    return np.concatenate(parts, axis=1)


class TabularEncoder:
    """An `Encoder` of kind "tabular": the schema's preprocessing, plus optional random Fourier features."""

    kind = "tabular"
    name = "tabular"

    def __init__(self, schema: TableSchema, state: Mapping[str, torch.Tensor], device: str) -> None:
        self.schema = schema
        self.feature_dim = schema.feature_dim
        self.device = torch.device(device)
        self._state = {k: v.detach().cpu().float() for k, v in state.items()}
        self._projection = {k: v.to(self.device) for k, v in self._state.items()}
        self.fingerprint = encoder_fingerprint(self.state_dict(), self.describe())

    def embed(self, inputs: np.ndarray) -> torch.Tensor:
        """Coded rows (N, columns) to (N, feature_dim) features."""
        coded = np.asarray(inputs, dtype=np.float64)
        if coded.ndim != 2 or coded.shape[1] != len(self.schema.columns):
            raise EncoderError(f"tabular inputs must be coded rows (N, {len(self.schema.columns)}), got {coded.shape}")
        with torch.inference_mode():
            x = torch.from_numpy(preprocess(self.schema, coded)).float().to(self.device)
            if self._projection:
                dim = self._projection[RF_BIAS].numel()
                waves = torch.cos(x @ self._projection[RF_WEIGHT] + self._projection[RF_BIAS]) * math.sqrt(2.0 / dim)
                x = torch.cat([x, waves], dim=1)
            return x.cpu()

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "coding": CODING, "schema": self.schema.to_dict()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self._state)


def load_tabular(cfg: BackboneConfig, device: str = "cpu") -> TabularEncoder:
    """The encoder a run config declares: its schema file (backbone.schema) and the seeded projection."""
    if not cfg.schema:
        raise EncoderError("backbone.schema: a tabular encoder needs the schema file that declares its columns")
    schema = load_schema(cfg.schema)
    return TabularEncoder(schema, random_feature_state(schema), device)


def rebuild_tabular(description: Mapping[str, Any], state: Mapping[str, torch.Tensor], device: str) -> TabularEncoder:
    """A tabular encoder from its describe() and state_dict(), e.g. read back from model.pt (no schema file)."""
    if description.get("coding") != CODING:
        raise EncoderError(f"tabular encoder coding {str(description.get('coding'))[:40]!r} is not {CODING!r}")
    try:
        schema = schema_from_dict(description.get("schema"))
    except ValueError as err:
        raise EncoderError(f"tabular encoder schema: {err}") from None
    expected = random_feature_state(schema)
    shapes = {k: tuple(v.shape) for k, v in expected.items()}
    if {k: tuple(v.shape) for k, v in state.items()} != shapes:
        raise EncoderError(f"tabular encoder weights must be {shapes or 'empty'} for its schema")
    return TabularEncoder(schema, state, device)
