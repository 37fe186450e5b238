"""One deployed ClientApp process, phase by phase: what Flower's process-per-message model costs a site.

Flower 1.41's SuperExec starts `flwr-clientapp` for every message; that process imports
Flower's runtime, loads our ClientApp, builds the site and answers. This module plays one
such process in a fresh interpreter on a deployed site's folder and prints one JSON line:
the seconds of each phase and whether the backbone was built. `benchmarks.deployed_round`
runs it; by hand:

    .venv/bin/python -m benchmarks.clientapp_process SITE_YAML RUN_CONFIG_JSON [ROUND]

Only the standard library is imported before the clock starts, so the import phases are
what `flwr-clientapp` pays. The site folder is written to (ledger, audit log): use a copy.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def one_message(site_yaml: Path, run_config: dict[str, Any], server_round: int) -> dict[str, Any]:
    """Import, build the site and answer one training message, timing each phase (seconds)."""
    t0 = time.perf_counter()
    import flwr.supernode.runtime.run_clientapp  # noqa: F401  what flwr-clientapp imports before our app

    t1 = time.perf_counter()
    from fedtransfer.client import client_app
    from fedtransfer.client.prepared import PreparedEncoder
    from fedtransfer.client.site import get_site

    t2 = time.perf_counter()
    from fedtransfer.common.config.run import config_from_dict, to_run_config
    from flwr.app import Context, RecordDict

    cfg = config_from_dict(run_config)
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"site-config": str(site_yaml)},
        state=RecordDict(),
        run_config=to_run_config(cfg),
    )
    t3 = time.perf_counter()
    site = get_site(context, cfg)  # client_app.train finds it in the process cache, as in a real process
    t4 = time.perf_counter()
    message = _train_message(site, server_round)  # the server's work, not the site's: untimed
    t5 = time.perf_counter()
    reply = client_app.train(message, context)
    t6 = time.perf_counter()
    built = not isinstance(site.backbone, PreparedEncoder) or site.backbone.loaded
    return {
        "flower_imports_s": t1 - t0,
        "app_imports_s": t2 - t1,
        "site_s": t4 - t3,
        "train_s": t6 - t5,
        "backbone_built": built,
        "error": reply.error.reason[:300] if reply.has_error() else None,
    }


def _train_message(site: Any, server_round: int) -> Any:
    """A training message as the server sends it: a fresh head, this run's config and the site's fingerprint."""
    import torch
    from fedtransfer.common.model.head import make_head
    from fedtransfer.common.wire.exchange import head_to_arrays
    from fedtransfer.common.wire.protocol import Cfg
    from flwr.app import ConfigRecord, Message, Metadata, RecordDict

    torch.manual_seed(0)
    head = make_head(site.backbone.feature_dim, len(site.data.train.classes), 0)
    config = ConfigRecord(
        {Cfg.RUN_ID: "benchmark", Cfg.FINGERPRINT: site.backbone.fingerprint, Cfg.SERVER_ROUND: server_round}
    )
    meta = Metadata(
        run_id=1,
        message_id=f"m-{server_round}",
        src_node_id=1,
        dst_node_id=1,
        reply_to_message_id="",
        group_id=str(server_round),
        created_at=time.time(),
        ttl=3600.0,
        message_type="train",
    )
    return Message(content=RecordDict({"arrays": head_to_arrays(head), "config": config}), metadata=meta)


if __name__ == "__main__":
    site_yaml, config = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    print(json.dumps(one_message(site_yaml, config, int(sys.argv[3]) if len(sys.argv) > 3 else 1)))
