#!/usr/bin/env bash
# Installs what building and testing nvembed needs, skipping whatever is already there:
# Debian packages, pgvector (from Debian trixie's source package, built against our PG),
# cargo-pgrx, and cargo-pgrx's registration of the PostgreSQL to build against.
set -euo pipefail
PG_CONFIG=${1:-pg_config}
PGRX_VERSION=${2:-0.18.1}
PGVECTOR_VERSION=${3:-0.8.0}
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive

need_pkgs=()
for p in postgresql-15 postgresql-server-dev-15 postgresql-contrib libclang-dev libdnnl-dev sudo pkg-config build-essential dpkg-dev; do
  dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

SHAREDIR=$("$PG_CONFIG" --sharedir)
if [ ! -f "$SHAREDIR/extension/vector.control" ]; then
  src_list=/etc/apt/sources.list.d/nvembed-trixie-src.list
  echo "deb-src http://deb.debian.org/debian trixie main" | $SUDO tee "$src_list" >/dev/null
  trap '$SUDO rm -f "$src_list"; $SUDO apt-get update -qq || true' EXIT
  $SUDO apt-get update -qq
  work=$(mktemp -d)
  chmod 755 "$work" # apt's download user must be able to write there
  (cd "$work" && apt-get source --download-only "pgvector=${PGVECTOR_VERSION}*" >/dev/null 2>&1 || apt-get source --download-only pgvector >/dev/null)
  tarball=$(ls "$work"/pgvector_*.orig.tar.* | head -n1)
  mkdir -p "$work/src" && tar -xf "$tarball" -C "$work/src" --strip-components=1
  make -C "$work/src" PG_CONFIG="$PG_CONFIG" >/dev/null
  $SUDO make -C "$work/src" PG_CONFIG="$PG_CONFIG" install >/dev/null
  rm -rf "$work"
  $SUDO rm -f "$src_list"; $SUDO apt-get update -qq || true
  trap - EXIT
fi

if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
  cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi
# `cargo pgrx init` forces a rebuild: only when PostgreSQL 15 is not registered yet.
if ! grep -q '^pg15 = ' "${PGRX_HOME:-$HOME/.pgrx}/config.toml" 2>/dev/null; then
  cargo pgrx init --pg15 "$(command -v "$PG_CONFIG")"
fi
