#!/usr/bin/env bash
# oneDNN for the engine's CPU kernels, built from source into PREFIX and linked statically.
# Debian's own libdnnl is 2.6.3; int8 weights decompressed inside the matmul (f32 or bf16
# activations, AVX2 to AMX) need 3.x. The source is oneDNN's as published on crates.io (the
# `onednn-src` crate, a registry the build already uses: immutable, no other download). Only the
# primitives the engine calls are built, static and position-independent (it is linked into the
# model server and the CLI), threaded with GNU OpenMP like Debian's build.
# Kept as it is while PREFIX holds a build of the same inputs (the stamp below); ~22 min on 2
# cores otherwise. PREFIX must be absolute, and is only replaced if it is empty, missing, or a
# build of this script (it holds the stamp).
# Usage: onednn.sh PREFIX
set -euo pipefail
PREFIX=$1
CRATE=onednn-src
CRATE_VERSION=0.1.22 # oneDNN 3.14.1
CMAKE_OPTIONS=(-DCMAKE_BUILD_TYPE=Release -DCMAKE_POSITION_INDEPENDENT_CODE=ON -DONEDNN_LIBRARY_TYPE=STATIC
  -DONEDNN_CPU_RUNTIME=OMP -DONEDNN_GPU_RUNTIME=NONE -DONEDNN_BUILD_GRAPH=OFF -DONEDNN_BUILD_EXAMPLES=OFF
  -DONEDNN_BUILD_TESTS=OFF -DONEDNN_BUILD_DOC=OFF -DONEDNN_ENABLE_WORKLOAD=INFERENCE
  '-DONEDNN_ENABLE_PRIMITIVE=MATMUL;REORDER;SOFTMAX' -DONEDNN_ENABLE_JIT_PROFILING=OFF -DONEDNN_ENABLE_ITT_TASKS=OFF)
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo

case $PREFIX in
  /?*) ;;
  *) echo "onednn.sh: PREFIX must be an absolute path other than / (got \"$PREFIX\")" >&2; exit 2 ;;
esac
# What built PREFIX: the crate and the cmake options, so that an edit elsewhere in this script
# does not rebuild it, and a change of either does.
recipe=$(printf '%s\n' "$CRATE $CRATE_VERSION" "${CMAKE_OPTIONS[@]}" | sha256sum | cut -d' ' -f1)
stamp=$PREFIX/nvembed-recipe
if [ "$(cat "$stamp" 2>/dev/null)" = "$recipe" ] && [ -f "$PREFIX/lib/libdnnl.a" ]; then
  exit 0
fi
if [ -e "$PREFIX" ] && ! [ -f "$stamp" ] && [ -n "$(ls -A "$PREFIX")" ]; then
  echo "onednn.sh: $PREFIX is not empty and was not made by this script: give another NVEMBED_ONEDNN_PREFIX" >&2
  exit 2
fi
for tool in cmake g++ cargo; do
  command -v "$tool" >/dev/null || { echo "onednn.sh: $tool is missing (make setup installs it)" >&2; exit 2; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# cargo fetches the crate into its registry cache; the .crate file is a gzipped tarball.
mkdir -p "$work/fetch/src"
printf '[package]\nname = "fetch-onednn"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\n%s = "=%s"\n' \
  "$CRATE" "$CRATE_VERSION" >"$work/fetch/Cargo.toml"
: >"$work/fetch/src/lib.rs"
cargo fetch -q --manifest-path "$work/fetch/Cargo.toml"
crate_file=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"$CRATE-$CRATE_VERSION.crate" | head -n1)
tar -xzf "$crate_file" -C "$work"
source_dir=$work/$CRATE-$CRATE_VERSION/oneDNN

echo "onednn.sh: building oneDNN from $CRATE $CRATE_VERSION into $PREFIX"
cmake -S "$source_dir" -B "$work/build" -DCMAKE_INSTALL_PREFIX="$PREFIX" "${CMAKE_OPTIONS[@]}" >"$work/cmake.log" ||
  { cat "$work/cmake.log" >&2; exit 1; }
cmake --build "$work/build" -j"$(nproc)" >"$work/build.log" 2>&1 || { tail -n 50 "$work/build.log" >&2; exit 1; }
$SUDO rm -rf "$PREFIX"
$SUDO cmake --install "$work/build" >/dev/null
echo "$recipe" | $SUDO tee "$stamp" >/dev/null
