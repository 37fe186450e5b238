"""The ServerApp: reads the run config, runs the federation, reports a user error in one line."""

from __future__ import annotations

import json
from logging import ERROR

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common import atomic
from common.config import ConfigError, config_from_run_config
from common.data import DataError
from common.encoders import EncoderError
from server.federation import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = None
    try:
        cfg = config_from_run_config(context.run_config)
        run_federation(grid, cfg, resume=cfg.resume)
    except (ConfigError, DataError, EncoderError) as err:
        log(ERROR, "fedtransfer: %s", err)
        if cfg is not None:
            cfg.output_path.mkdir(parents=True, exist_ok=True)
            atomic.write_text(cfg.output_path / "status.json", json.dumps({"status": "failed", "reason": str(err)}))
