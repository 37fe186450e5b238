"""One privacy mechanism per protocol × trust, chosen once from the run config (`mechanism_for`).

Every module of this folder is imported here, and each `Mechanism` subclass that names a protocol and
a trust is registered: adding a mechanism is adding a file. `event_of` reads back what a logged or
sent DP record spent, for the server's report and the audit.
"""

from __future__ import annotations

import importlib
import pkgutil

from fedtransfer.common.config.parse import ConfigError
from fedtransfer.common.config.run import RunConfig
from fedtransfer.common.privacy.events import SelfComposedDpEvent, gaussian_steps, skellam_steps
from fedtransfer.common.privacy.mechanisms.base import Mechanism, SiteTensors, Trained
from fedtransfer.common.wire.protocol import DPRecord

__all__ = ["Mechanism", "SiteTensors", "Trained", "event_of", "mechanism_for", "mechanisms"]


def mechanisms() -> dict[tuple[str, str], type[Mechanism]]:
    """Every mechanism of this folder by (protocol, trust)."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    found: dict[tuple[str, str], type[Mechanism]] = {}
    pending = list(Mechanism.__subclasses__())
    while pending:
        kind = pending.pop()
        pending += kind.__subclasses__()
        if kind.__module__.startswith(__name__ + "."):
            found[(kind.protocol, kind.trust)] = kind
    return found


def mechanism_for(cfg: RunConfig) -> Mechanism:
    """The mechanism of this run's train.protocol and privacy.trust; ConfigError for a pair none serves."""
    key = (cfg.train.protocol, cfg.privacy.trust)
    kind = mechanisms().get(key)
    if kind is None:
        raise ConfigError(
            f"train.protocol {key[0]!r} with privacy.trust {key[1]!r}: no privacy mechanism serves this pair; "
            f"choose one of {sorted(mechanisms())}"
        )
    return kind(cfg)


def event_of(dp: DPRecord) -> SelfComposedDpEvent:
    """The accountant event a logged or sent DP record stands for: a Gaussian or a Skellam one."""
    if dp.mechanism == "skellam":
        return skellam_steps(
            dp.noise_variance,
            dp.sample_rate,
            dp.steps,
            l1=dp.l1_sensitivity,
            l2=dp.l2_sensitivity,
            min_survivors=dp.min_survivors,
            colluding_sites=dp.colluding_sites,
        )
    return gaussian_steps(dp.noise_multiplier, dp.sample_rate, dp.steps)
