#!/usr/bin/env bash
# Start the fedtransfer SuperLink (flwr 1.41) with TLS and SuperNode authentication.
#
# flwr 1.41 serves the Runtime, Control and Fleet APIs on ONE port, so the SuperLink
# listens on loopback only; remote sites reach /v1/fleet/ through deploy/proxy.
# Mirrors deploy.launch.superlink_argv (tests/test_deploy.py checks they agree).
#
# Usage: start-superlink.sh [--dry-run]      (--dry-run prints the argv, one per line)
# Environment:
#   FEDTRANSFER_CREDENTIALS   dir made by `python -m deploy.credentials` (required)
#   FEDTRANSFER_SUPERLINK_HOST  bind address (default 127.0.0.1)
#   FEDTRANSFER_SUPERLINK_PORT  port for all APIs (default 8000)
#   FEDTRANSFER_DATABASE      SQLite state file; holds the site registrations, so set
#                             it in production (default: in-memory, lost on restart)
#   FEDTRANSFER_EXPOSE_CONTROL_API=1  required to bind a non-loopback host
#   FLOWER_BIN_DIR            dir holding flower-superlink (default: from PATH)
set -euo pipefail

creds="$(cd "${FEDTRANSFER_CREDENTIALS:?set FEDTRANSFER_CREDENTIALS to the credentials dir}" && pwd -P)"
host="${FEDTRANSFER_SUPERLINK_HOST:-127.0.0.1}"
port="${FEDTRANSFER_SUPERLINK_PORT:-8000}"

case "$host" in
  127.*|localhost|::1) ;;
  *)
    if [[ "${FEDTRANSFER_EXPOSE_CONTROL_API:-0}" != 1 ]]; then
      echo "refusing --host $host: it would expose the Control API (shared port in" \
           "flwr 1.41); use deploy/proxy, or set FEDTRANSFER_EXPOSE_CONTROL_API=1" >&2
      exit 2
    fi ;;
esac

args=(
  "${FLOWER_BIN_DIR:+$FLOWER_BIN_DIR/}flower-superlink"
  --ssl-ca-certfile "$creds/ca/ca.crt"
  --ssl-certfile "$creds/superlink/server.crt"
  --ssl-keyfile "$creds/superlink/server.key"
  --enable-supernode-auth
  --host "$host"
  --port "$port"
  --disable-runtime-dependency-installation
)
if [[ -n "${FEDTRANSFER_DATABASE:-}" ]]; then
  args+=(--database "$FEDTRANSFER_DATABASE")
fi

if [[ "${1:-}" == --dry-run ]]; then
  printf '%s\n' "${args[@]}"
  exit 0
fi
export FLWR_DISABLE_UPDATE_CHECK=1 FLWR_TELEMETRY_ENABLED=0
if [[ -n "${FLOWER_BIN_DIR:-}" ]]; then
  export PATH="$FLOWER_BIN_DIR:$PATH"  # the SuperLink spawns flower-superexec by name
fi
exec "${args[@]}"
