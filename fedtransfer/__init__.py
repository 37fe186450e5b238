"""fedtransfer: federated, differentially private transfer learning on Flower.

The project's top-level folders install under this one import name (pyproject.toml maps them):
`fedtransfer.common` (config, data, encoders, model, privacy, wire, storage), `fedtransfer.client`
(a site), `fedtransfer.server` (the federation, launching a run, export, the audit),
`fedtransfer.deploy` (credentials and service command lines) and `fedtransfer.cli` (the command).

In a checkout (or the app folder Flower unpacks a FAB into) this folder stands beside those
folders, so the checkout's own code is what runs there, installed or not, as in any git worktree;
`extend_path` keeps an installed copy reachable when this folder stands first on `sys.path`.
"""

from pathlib import Path
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)

_CHECKOUT = Path(__file__).resolve().parent.parent
if (_CHECKOUT / "common" / "__init__.py").is_file() and (_CHECKOUT / "client" / "__init__.py").is_file():
    __path__.insert(0, str(_CHECKOUT))
