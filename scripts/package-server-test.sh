#!/usr/bin/env bash
# Installs the model server's .deb with apt-get, checks its systemd unit with systemd-analyze
# (where there is one), runs the installed executable as the nvembed user the package made,
# over plaintext loopback with the tiny model (/health, one embedding), then removes the
# package and checks that only its configuration file is left.
# Usage: package-server-test.sh DEB
set -euo pipefail
cd "$(dirname "$0")/.."
deb=$(realpath "$1")
fail() { echo "FAIL: $*" >&2; exit 1; }
SUDO=""; AS_NVEMBED=(runuser -u nvembed --)
[ "$(id -u)" = 0 ] || { SUDO=sudo; AS_NVEMBED=(sudo -u nvembed); }
mapfile -t files < <(dpkg-deb -c "$deb" | awk '$1 !~ /^d/ { sub(/^\./, "", $6); print $6 }')
for f in "${files[@]}"; do [ ! -e "$f" ] || fail "$f is there before the package is installed"; done
work=$(mktemp -d); chmod 755 "$work"
server=""
cleanup() {
  [ -z "$server" ] || kill "$server" 2>/dev/null || true
  $SUDO apt-get purge -y -qq nvembed-model-server >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$deb" >/dev/null || fail "apt-get install $deb"
for f in "${files[@]}"; do [ -f "$f" ] || fail "the package did not install $f"; done
getent passwd nvembed >/dev/null || fail "no nvembed user"
[ "$(stat -c '%a %G' /etc/nvembed)" = "750 nvembed" ] || fail "/etc/nvembed is $(stat -c '%a %G' /etc/nvembed)"
if command -v systemd-analyze >/dev/null; then
  verify=$(systemd-analyze verify /lib/systemd/system/nvembed-model-server.service 2>&1) || fail "systemd-analyze: $verify"
  [ -z "$verify" ] || fail "systemd-analyze: $verify"
fi
/usr/bin/nvembed-model-server --help | grep -q -- '--http-listen 0.0.0.0:8443' || fail "--help shows no example"
cp -r engine/tests/fixtures/nvembed-tiny-a "$work/model"; chmod -R a+rX "$work"
port=$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"${AS_NVEMBED[@]}" /usr/bin/nvembed-model-server --model "$work/model" --dtype f32 --served-model-name tiny \
  --http-listen "127.0.0.1:$port" --allow-plaintext --no-tokens 2>"$work/log" &
server=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$port/health" >/dev/null || fail "the installed server did not start: $(cat "$work/log")"
dims=$(curl -sS "http://127.0.0.1:$port/v1/embeddings" -H 'Content-Type: application/json' \
  -d '{"input": "installed from a package", "model": "tiny"}' | python3 -c "import json, sys; print(len(json.load(sys.stdin)['data'][0]['embedding']))")
[ "$dims" = 32 ] || fail "the installed server answered $dims dimensions: $(cat "$work/log")"
grep -q "WARNING: serving HTTP on 127.0.0.1:$port without TLS" "$work/log" || fail "plaintext was not logged: $(cat "$work/log")"
kill "$server"; wait "$server" 2>/dev/null || true; server=""
$SUDO apt-get remove -y -qq nvembed-model-server >/dev/null
for f in "${files[@]}"; do
  [ "$f" = /etc/default/nvembed-model-server ] || [ ! -e "$f" ] || fail "apt-get remove left $f"
done
echo "PASS server package: apt-get install $(basename "$deb") ($(wc -l <<<"$(printf '%s\n' "${files[@]}")") files), nvembed user, unit verified, the installed server embeds as that user; apt-get remove keeps only its configuration"
