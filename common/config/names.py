"""The one rule for site names, shared by a site's own YAML and the deployment's credentials.

A site name is a folder name (`sites/<name>/` of the credentials, the site's ledger entries),
a systemd instance name (`fedtransfer-supernode@<name>`) and a DNS-style label in logs and
reports, so it must be safe in all of them: the strictest of the three is the rule.
"""

from __future__ import annotations

import re

from fedtransfer.common.errors import InputError

SITE_NAME_RULE = "use 1-63 lowercase letters, digits or '-', starting with a letter or digit"
_SITE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def is_site_name(name: object) -> bool:
    """True when `name` may name a site everywhere a site name is used."""
    return isinstance(name, str) and _SITE_NAME.fullmatch(name) is not None


def validate_site_name(name: object) -> str:
    """Return `name` when it is a valid site name; otherwise an InputError that states the rule."""
    if not is_site_name(name):
        raise InputError(f"invalid site name {name!r}: {SITE_NAME_RULE}")
    return str(name)
