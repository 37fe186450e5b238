"""The ServerApp: reads the run config, runs the federation, reports a user error in one line."""

from __future__ import annotations

import json
from logging import ERROR, INFO

from fedtransfer.common.config.run import ConfigError, config_from_run_config
from fedtransfer.common.data.sources import DataError
from fedtransfer.common.encoders.interface import EncoderError
from fedtransfer.common.storage import atomic
from fedtransfer.common.storage.private import restrict_umask
from fedtransfer.common.wire.flower_pin import quick_object_pulls
from fedtransfer.server.federation.loop import run_federation
from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation; a user error is one line in the log and a failed status.json.

    The run folder (audit log, privacy report, checkpoints) is the operator's alone, however the
    SuperLink was started (`flwr run .` on a SuperLink started by hand included).
    """
    restrict_umask()
    if (refused := quick_object_pulls()) is not None:  # replies' objects: common/wire/flower_pin.py
        log(INFO, "fedtransfer: %s: replies' objects not there yet are asked again after Flower's 1 s", refused)
    cfg = None
    try:
        cfg = config_from_run_config(context.run_config)
        run_federation(grid, cfg, resume=cfg.resume)
    except (ConfigError, DataError, EncoderError) as err:
        log(ERROR, "fedtransfer: %s", err)
        if cfg is not None:
            cfg.output_path.mkdir(parents=True, exist_ok=True)
            atomic.write_text(cfg.output_path / "status.json", json.dumps({"status": "failed", "reason": str(err)}))
