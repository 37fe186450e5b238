"""Bytes a site sends per round: head-only against full-model FedAvg, for every registered backbone.

The floor is the head's parameter count × 4 bytes (float32). The wire size is what Flower's
ArrayRecord carries for the same tensors (payload + numpy header per tensor).

    .venv/bin/python -m benchmarks.communication [--classes 10]
"""

from __future__ import annotations

import argparse

from fedtransfer.common.config.catalog import CATALOG
from fedtransfer.common.encoders.image import IMAGE_BACKBONES, feature_network
from fedtransfer.common.model.head import make_head
from fedtransfer.common.wire.exchange import head_to_arrays, wire_bytes
from flwr.app import ArrayRecord

from benchmarks.harness import print_table, write_results


def measure(name: str, classes: int) -> dict:
    head = make_head(CATALOG[name].feature_dim, classes)
    net = feature_network(name)  # shapes only: no weights needed
    head_params = sum(p.numel() for p in head.parameters())
    floor = head_params * 4
    wire = wire_bytes(head_to_arrays(head))
    full = wire_bytes(ArrayRecord({**net.state_dict(), **{f"h.{k}": v for k, v in head.state_dict().items()}}))
    return {
        "backbone": name,
        "head_params": head_params,
        "floor_bytes": floor,
        "head_wire_bytes": wire,
        "over_floor_pct": 100.0 * (wire - floor) / floor,
        "full_model_bytes": full,
        "full_over_head": full / wire,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args()
    rows = [measure(name, args.classes) for name in IMAGE_BACKBONES]
    print_table(rows, list(rows[0]))
    write_results("communication", rows, {"classes": args.classes})


if __name__ == "__main__":
    main()
