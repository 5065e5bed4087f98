#!/usr/bin/env bash
# The PostgreSQL majors nvembed is built and tested against, each with pgvector, registered with
# cargo-pgrx. 15 is bookworm's own package; majors that bookworm has no binaries for are built
# from Debian's source packages into PG_PREFIX/MAJOR. Whatever already holds the pinned version is
# kept as it is, as long as it was built by this recipe (see RECIPE below).
# Usage: postgres.sh PG_PREFIX PGVECTOR_VERSION MAJOR...
set -euo pipefail
PREFIX_ROOT=$1; shift
PGVECTOR_VERSION=$1; shift
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
# PostgreSQL's makefiles decide from the make level and flags they inherit whether to generate
# headers (utils/errcodes.h, ...): started under `make test` -> `make setup` they skipped them and
# the build failed. Every build below starts as it would from a shell, whoever runs this script.
unset MAKELEVEL MAKEFLAGS MFLAGS MAKEOVERRIDES GNUMAKEFLAGS

# Source-built majors: the Debian suite that has the source and the upstream version built.
declare -A SUITE=([17]=trixie [18]=sid)
declare -A VERSION=([17]=17.12 [18]=18.6)

pg_config_of() { bash "$(dirname "$0")/pg-config.sh" "$PREFIX_ROOT" "$1"; }
has_pgvector() { [ -f "$("$1" --sharedir)/extension/vector.control" ]; }

# What built a major's PostgreSQL and pgvector, the way CI caches are keyed on their inputs: this
# script, pg-config.sh and the pinned versions. Written beside pgvector once both are installed; a
# major whose stamp differs is built again (a source-built prefix from scratch), so a change that
# breaks the recipe fails on the machine that made it, not on the next fresh one.
recipe_of() {
  { cat "$0" "$(dirname "$0")/pg-config.sh"
    echo "major $1 postgresql ${VERSION[$1]:-debian} ${SUITE[$1]:-bookworm} pgvector $PGVECTOR_VERSION"
  } | sha256sum | cut -d' ' -f1
}
recipe_file() { echo "$("$1" --sharedir)/extension/vector.nvembed-recipe"; }
built_by_recipe() { [ "$(cat "$(recipe_file "$2")" 2>/dev/null)" = "$(recipe_of "$1")" ]; }

build_pg=() build_vector=()
for major in "$@"; do
  pg_config=$(pg_config_of "$major")
  if [ "$major" != 15 ]; then
    [ -n "${SUITE[$major]:-}" ] || { echo "postgres.sh: no source recipe for PostgreSQL $major" >&2; exit 2; }
    if ! [ -x "$pg_config" ] || [ "$("$pg_config" --version)" != "PostgreSQL ${VERSION[$major]}" ] ||
      ! [ -f "$("$pg_config" --sharedir)/extension/dblink.control" ] || ! built_by_recipe "$major" "$pg_config"; then
      build_pg+=("$major"); build_vector+=("$major"); continue
    fi
  fi
  { has_pgvector "$pg_config" && built_by_recipe "$major" "$pg_config"; } || build_vector+=("$major")
done

if [ ${#build_vector[@]} -gt 0 ]; then
  need_pkgs=()
  [ ${#build_pg[@]} -eq 0 ] || for p in zlib1g-dev bison flex; do dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p"); done
  src_list=/etc/apt/sources.list.d/nvembed-src.sources
  cleanup() { $SUDO rm -f "$src_list"; $SUDO apt-get update -qq || true; rm -rf "${work:-}"; }
  trap cleanup EXIT
  # Source suites from the mirror this machine's apt already uses, removed again when done.
  mirror=$(awk '$1 == "URIs:" { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" { print $2; exit }' /etc/apt/sources.list)
  printf 'Types: deb-src\nURIs: %s\nSuites: trixie sid\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$mirror" | $SUDO tee "$src_list" >/dev/null
  $SUDO apt-get update -qq
  [ ${#need_pkgs[@]} -eq 0 ] || $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
  work=$(mktemp -d)
  chmod 755 "$work" # apt's download user must be able to write there
fi

# fetch PACKAGE UPSTREAM_VERSION DIR: the upstream tarball of Debian's source package, in DIR.
fetch() {
  local package=$1 version=$2 dir=$3 debian_version
  debian_version=$(apt-cache showsrc "$package" | awk -v v="$version-" '$1 == "Version:" && index($2, v) == 1 { print $2; exit }')
  if [ -z "$debian_version" ]; then
    echo "postgres.sh: Debian's archive has no source of $package $version" >&2
    return 1
  fi
  mkdir -p "$work/dl-$package-$version" && chmod 755 "$work/dl-$package-$version"
  (cd "$work/dl-$package-$version" && apt-get source --download-only "$package=$debian_version" >/dev/null 2>&1) || {
    echo "postgres.sh: Debian's index lists $package $debian_version but the archive does not serve its files" >&2
    return 1
  }
  mkdir -p "$dir"
  tar -xf "$(ls "$work/dl-$package-$version"/*.orig.tar.* | head -n1)" -C "$dir" --strip-components=1
}

for major in "${build_pg[@]}"; do
  prefix="$PREFIX_ROOT/$major"
  echo "building PostgreSQL ${VERSION[$major]} (Debian ${SUITE[$major]} source) into $prefix"
  # From scratch: nothing of an older recipe's build (or of what was installed into it) survives.
  $SUDO rm -rf "$prefix"
  # The server runs as the postgres OS user: PG_PREFIX must let it in (`mktemp -d` makes 0700).
  $SUDO install -d "$PREFIX_ROOT" && $SUDO chmod a+rx "$PREFIX_ROOT"
  fetch "postgresql-$major" "${VERSION[$major]}" "$work/pg$major"
  (
    cd "$work/pg$major"
    # What building and testing an extension needs: server, headers, client programs, and the
    # dblink the SQL tests open second sessions with.
    ./configure --prefix="$prefix" --without-icu --without-readline >/dev/null
    make -j"$(nproc)" -s >/dev/null
    make -C contrib/dblink -s >/dev/null
    $SUDO make -s install >/dev/null
    $SUDO make -C contrib/dblink -s install >/dev/null
  )
done

for major in "${build_vector[@]}"; do
  pg_config=$(pg_config_of "$major")
  fetch pgvector "$PGVECTOR_VERSION" "$work/pgvector$major"
  if [ "$major" -ge 18 ]; then
    # pgvector 0.8.0 predates PostgreSQL 18, which gave vacuum_delay_point() an argument and made
    # TupleDesc's attribute array private (pgvector 0.8.1 made the same two changes). sid's newer
    # pgvector is listed in Debian's index, but the archive does not serve its files.
    sed -i 's/vacuum_delay_point()/vacuum_delay_point(false)/' "$work/pgvector$major"/src/*.c
    sed -i 's/buildstate->tupdesc->attrs\[0\]\.atttypid/TupleDescAttr(buildstate->tupdesc, 0)->atttypid/' \
      "$work/pgvector$major/src/ivfbuild.c"
  fi
  echo "building pgvector $PGVECTOR_VERSION (Debian trixie source) for PostgreSQL $major"
  make -C "$work/pgvector$major" -s PG_CONFIG="$pg_config" >/dev/null
  $SUDO make -C "$work/pgvector$major" -s PG_CONFIG="$pg_config" install >/dev/null
  recipe_of "$major" | $SUDO tee "$(recipe_file "$pg_config")" >/dev/null
done

# cargo-pgrx builds and tests against exactly these. `cargo pgrx init` forces a rebuild of the
# bindings: only when a major is not registered yet.
config="${PGRX_HOME:-$HOME/.pgrx}/config.toml"
init_args=() missing=0
for major in "$@"; do
  init_args+=("--pg$major" "$(pg_config_of "$major")")
  grep -q "^pg$major = \"$(pg_config_of "$major")\"" "$config" 2>/dev/null || missing=1
done
[ "$missing" = 0 ] || cargo pgrx init "${init_args[@]}"
