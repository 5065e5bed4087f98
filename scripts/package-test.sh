#!/usr/bin/env bash
# Installs the .deb of PG_CONFIG's major with apt-get (as a user would), runs CREATE EXTENSION and
# an embedding on a fresh cluster, then removes the package again and checks that it left no file;
# a build that was installed by hand before is put back.
# Usage: package-test.sh DEB
set -euo pipefail
cd "$(dirname "$0")/.."
deb=$(realpath "$1")
source scripts/cluster.sh
fail() { echo "FAIL: $*" >&2; exit 1; }
package=$(dpkg-deb -f "$deb" Package)
# What the package ships must not be there before: the test sees only what apt-get installs.
# A build installed by hand (make install, the other tests) is put back afterwards.
mapfile -t files < <(dpkg-deb -c "$deb" | awk '$1 !~ /^d/ { sub(/^\./, "", $6); print $6 }')
saved=$(mktemp -d)
for i in "${!files[@]}"; do [ ! -f "${files[$i]}" ] || $SUDO cp -a "${files[$i]}" "$saved/$i"; done
cleanup() {
  cluster_stop
  $SUDO apt-get remove -y -qq "$package" >/dev/null 2>&1 || true
  for i in "${!files[@]}"; do [ ! -f "$saved/$i" ] || $SUDO cp -a "$saved/$i" "${files[$i]}"; done
  $SUDO rm -rf "$saved"
}
trap cleanup EXIT
$SUDO rm -f "${files[@]}"
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$deb" >/dev/null || fail "apt-get install $deb"
for f in "${files[@]}"; do [ -f "$f" ] || fail "the package did not install $f"; done

cluster_start engine/tests/fixtures/nvembed-tiny-a
result=$("${PSQL[@]}" -At <<'SQL'
CREATE EXTENSION vector;
CREATE EXTENSION nvembed;
SELECT extversion FROM pg_extension WHERE extname = 'nvembed';
SELECT abs(sqrt(sum(x * x)) - 1) < 1e-5 FROM unnest(nvembed_passage('installed from a package')) x;
SELECT loaded FROM nvembed_status();
SQL
)
version=$(dpkg-deb -f "$deb" Version)
[ "$result" = "$version"$'\nt\nt' ] || fail "after installing $deb: extversion, unit vector, loaded = $(tr '\n' ' ' <<<"$result") (want $version t t)"
cluster_stop
$SUDO apt-get remove -y -qq "$package" >/dev/null
for f in "${files[@]}"; do [ ! -e "$f" ] || fail "apt-get remove left $f"; done
echo "PASS package: apt-get install $(basename "$deb") ($(wc -l <<<"$(printf '%s\n' "${files[@]}")") files), CREATE EXTENSION $version, a unit vector from the model server it installed; apt-get remove leaves no file"
