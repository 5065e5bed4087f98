#!/usr/bin/env bash
# The .deb of the model server alone, for hosts without PostgreSQL (a GPU host, for one): the
# executable in /usr/bin, a systemd unit, its flags in /etc/default, a system user `nvembed`
# (made by postinst), the README and the licence notice.
# Usage: package-server.sh OUT_DIR   (after `make server`; prints the .deb's path)
set -euo pipefail
cd "$(dirname "$0")/.."
# oneDNN is linked in statically: its licence and its third-party notices travel with it.
install_onednn_notices() {
  local notices=${NVEMBED_ONEDNN_PREFIX:?the Makefile sets it}/share/doc/dnnl
  install -m 644 "$notices/LICENSE" "$1/onednn-LICENSE"
  install -m 644 "$notices/THIRD-PARTY-PROGRAMS" "$1/onednn-THIRD-PARTY-PROGRAMS"
}
OUT=$1
VERSION=$(awk -F'"' '$1 ~ /^version/ { print $2; exit }' server/Cargo.toml)
ARCH=$(dpkg --print-architecture)
stage=target/package/nvembed-model-server
rm -rf "$stage"
install -d "$stage/DEBIAN" "$stage/usr/bin" "$stage/lib/systemd/system" "$stage/etc/default" \
  "$stage/usr/share/doc/nvembed-model-server"
install -m 755 target/release/nvembed-model-server "$stage/usr/bin/"
install -m 644 packaging/model-server/nvembed-model-server.service "$stage/lib/systemd/system/"
install -m 644 packaging/model-server/default "$stage/etc/default/nvembed-model-server"
install -m 644 README.md "$stage/usr/share/doc/nvembed-model-server/"
install -m 644 packaging/copyright "$stage/usr/share/doc/nvembed-model-server/copyright"
install_onednn_notices "$stage/usr/share/doc/nvembed-model-server"
install -m 755 packaging/model-server/postinst "$stage/DEBIAN/postinst"
echo /etc/default/nvembed-model-server > "$stage/DEBIAN/conffiles"
shlibs=$(cd "$stage" && mkdir -p debian && printf 'Source: nvembed\n\nPackage: nvembed\nArchitecture: any\n' > debian/control &&
  dpkg-shlibdeps -O -eusr/bin/nvembed-model-server 2>/dev/null | sed -n 's/^shlibs:Depends=//p'; rm -rf debian)
[ -n "$shlibs" ] || { echo "package-server.sh: dpkg-shlibdeps found no library dependencies" >&2; exit 1; }
cat > "$stage/DEBIAN/control" <<CONTROL
Package: nvembed-model-server
Version: $VERSION
Architecture: $ARCH
Maintainer: nvembed developers <nvembed@localhost>
Section: net
Priority: optional
Depends: adduser, $shlibs
Installed-Size: $(du -sk "$stage/usr" | cut -f1)
Homepage: https://huggingface.co/nvidia/NV-Embed-v2
Description: NV-Embed-v2 text embeddings over HTTPS (OpenAI-compatible API)
 nvembed's model server on its own: NVIDIA's NV-Embed-v2 embedding model behind OpenAI's
 /v1/embeddings API, with /health and /metrics, over TLS with bearer tokens. A systemd unit
 runs it as the nvembed user with the flags in /etc/default/nvembed-model-server. The model
 weights are not included; NV-Embed-v2 is licensed CC-BY-NC-4.0 (non-commercial use only), see
 /usr/share/doc/nvembed-model-server/copyright.
CONTROL
deb="$OUT/nvembed-model-server_${VERSION}_${ARCH}.deb"
mkdir -p "$OUT"
dpkg-deb --build --root-owner-group "$stage" "$deb" >/dev/null
echo "$deb"
