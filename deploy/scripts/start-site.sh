#!/usr/bin/env bash
# Start one site's SuperNode (flwr 1.41): trusts only the deployment CA and
# authenticates with the site's registered key.
# Mirrors deploy.launch.supernode_argv (tests/test_deploy.py checks they agree).
#
# Usage: start-site.sh SITE [--dry-run]      (--dry-run prints the argv, one per line)
# Environment:
#   FEDTRANSFER_CREDENTIALS  dir with ca/ca.crt and sites/SITE/auth.key (required)
#   FEDTRANSFER_SUPERLINK    Fleet endpoint HOST:PORT, i.e. the fleet proxy (required)
#   FEDTRANSFER_SITE_CONFIG  absolute path of the site's YAML config (required)
#   FEDTRANSFER_SUPERNODE_PORT  loopback port of the site's Runtime API (default 9094)
#   FLOWER_BIN_DIR           dir holding flower-supernode (default: from PATH)
set -euo pipefail

site="${1:?usage: start-site.sh SITE [--dry-run]}"
if ! [[ "$site" =~ ^[a-z0-9][a-z0-9-]{0,62}$ ]]; then
  echo "invalid site name '$site': use 1-63 lowercase letters, digits or '-'," \
       "starting with a letter or digit" >&2
  exit 2
fi
creds="$(cd "${FEDTRANSFER_CREDENTIALS:?set FEDTRANSFER_CREDENTIALS to the credentials dir}" && pwd -P)"
superlink="${FEDTRANSFER_SUPERLINK:?set FEDTRANSFER_SUPERLINK to HOST:PORT of the fleet endpoint}"
site_config="${FEDTRANSFER_SITE_CONFIG:?set FEDTRANSFER_SITE_CONFIG to the site YAML path}"
port="${FEDTRANSFER_SUPERNODE_PORT:-9094}"
if [[ "$site_config" != /* || "$site_config" == *"'"* ]]; then
  echo "FEDTRANSFER_SITE_CONFIG must be an absolute path without quotes" >&2
  exit 2
fi

args=(
  "${FLOWER_BIN_DIR:+$FLOWER_BIN_DIR/}flower-supernode"
  --root-certificates "$creds/ca/ca.crt"
  --superlink "$superlink"
  --auth-supernode-private-key "$creds/sites/$site/auth.key"
  --host 127.0.0.1
  --port "$port"
  --node-config "site-config='$site_config'"
)

if [[ "${2:-}" == --dry-run ]]; then
  printf '%s\n' "${args[@]}"
  exit 0
fi
export FLWR_DISABLE_UPDATE_CHECK=1 FLWR_TELEMETRY_ENABLED=0
if [[ -n "${FLOWER_BIN_DIR:-}" ]]; then
  export PATH="$FLOWER_BIN_DIR:$PATH"  # the SuperNode spawns flower-superexec by name
fi
exec "${args[@]}"
