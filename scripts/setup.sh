#!/usr/bin/env bash
# Installs what building and testing nvembed needs, skipping whatever is already there: Debian
# packages, cargo-pgrx, and each PostgreSQL major with pgvector (scripts/postgres.sh). oneDNN is
# built by scripts/onednn.sh (`make setup` runs both).
# Usage: setup.sh PGRX_VERSION PGVECTOR_VERSION PG_PREFIX MAJOR...
set -euo pipefail
PGRX_VERSION=$1
PGVECTOR_VERSION=$2
PG_PREFIX=$3
shift 3
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive

need_pkgs=()
for p in postgresql-15 postgresql-server-dev-15 postgresql-contrib libclang-dev cmake sudo pkg-config build-essential dpkg-dev \
         python3-venv openssl curl; do
  dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
  cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi
bash "$(dirname "$0")/postgres.sh" "$PG_PREFIX" "$PGVECTOR_VERSION" "$@"
