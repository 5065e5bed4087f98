#!/usr/bin/env bash
# One .deb per PostgreSQL major: nvembed.so, the control and SQL files (install and update
# scripts), the model server executable beside nvembed.so, the README and the licence notice
# (packaging/copyright, with the model's CC-BY-NC-4.0). Files go where Debian's postgresql-MAJOR
# looks for them, also for majors built here from source into another prefix.
# Usage: package.sh PG_PREFIX OUT_DIR MAJOR...   (after `make server`)
set -euo pipefail
cd "$(dirname "$0")/.."
# oneDNN is linked in statically: its licence and its third-party notices travel with it.
install_onednn_notices() {
  local notices=${NVEMBED_ONEDNN_PREFIX:?the Makefile sets it}/share/doc/dnnl
  install -m 644 "$notices/LICENSE" "$1/onednn-LICENSE"
  install -m 644 "$notices/THIRD-PARTY-PROGRAMS" "$1/onednn-THIRD-PARTY-PROGRAMS"
}
PREFIX_ROOT=$1; OUT=$2; shift 2
VERSION=$(awk -F'"' '$1 ~ /^version/ { print $2; exit }' extension/Cargo.toml)
ARCH=$(dpkg --print-architecture)
mkdir -p "$OUT"

for major in "$@"; do
  pg_config=$(bash scripts/pg-config.sh "$PREFIX_ROOT" "$major")
  built=target/package/pgrx-pg$major
  (cd extension && cargo pgrx package --pg-config "$pg_config" --out-dir "../$built" >"../$built.log" 2>&1) ||
    { cat "$built.log" >&2; exit 1; }
  stage=target/package/nvembed-pg$major
  rm -rf "$stage"
  lib=$stage/usr/lib/postgresql/$major/lib
  ext=$stage/usr/share/postgresql/$major/extension
  doc=$stage/usr/share/doc/nvembed-pg$major
  install -d "$lib" "$ext" "$doc" "$stage/DEBIAN"
  install -m 644 "$built$("$pg_config" --pkglibdir)/nvembed.so" "$lib/"
  install -m 755 target/release/nvembed-model-server "$lib/"
  install -m 644 "$built$("$pg_config" --sharedir)"/extension/nvembed* "$ext/"
  install -m 644 README.md "$doc/"
  install -m 644 packaging/copyright "$doc/copyright"
  install_onednn_notices "$doc"

  # Shared libraries the two binaries need, as package dependencies (libc6, libgomp1, ...).
  # (dpkg-shlibdeps reads a source package's debian/control: a minimal one, removed again.)
  shlibs=$(cd "$stage" && mkdir -p debian && printf 'Source: nvembed\n\nPackage: nvembed\nArchitecture: any\n' > debian/control &&
    dpkg-shlibdeps -O -e"usr/lib/postgresql/$major/lib/nvembed-model-server" -e"usr/lib/postgresql/$major/lib/nvembed.so" 2>/dev/null |
    sed -n 's/^shlibs:Depends=//p'; rm -rf debian)
  [ -n "$shlibs" ] || { echo "package.sh: dpkg-shlibdeps found no library dependencies" >&2; exit 1; }
  cat > "$stage/DEBIAN/control" <<EOF
Package: nvembed-pg$major
Version: $VERSION
Architecture: $ARCH
Maintainer: nvembed developers <nvembed@localhost>
Section: database
Priority: optional
Depends: postgresql-$major, $shlibs
Recommends: postgresql-$major-pgvector
Installed-Size: $(du -sk "$stage/usr" | cut -f1)
Homepage: https://huggingface.co/nvidia/NV-Embed-v2
Description: NV-Embed-v2 text embeddings inside PostgreSQL $major
 nvembed runs NVIDIA's NV-Embed-v2 embedding model inside PostgreSQL: nvembed_query() and
 nvembed_passage() return unit-length vectors for pgvector, triggers and vectorizers embed rows.
 One model server process per cluster, started by a background worker (add nvembed to
 shared_preload_libraries). The model weights are not included; NV-Embed-v2 is licensed
 CC-BY-NC-4.0 (non-commercial use only), see /usr/share/doc/nvembed-pg$major/copyright.
EOF
  dpkg-deb --build --root-owner-group "$stage" "$OUT/nvembed-pg${major}_${VERSION}_${ARCH}.deb" >/dev/null
  echo "$OUT/nvembed-pg${major}_${VERSION}_${ARCH}.deb"
done
