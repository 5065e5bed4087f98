#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU and no Rust, Postgres or network (the lent
# device of ../shared/NOTES.md): runs the prebuilt `gpu_check` example (engine/examples/
# gpu_check.rs, built with --features cuda) against the shipped fixture, and prints one table:
# goldens on the device per dtype, then tokens/s and query latency of random checkpoints of the
# medium shape and of NV-Embed-v2's own shape (7.1 B parameters, ~15 GB in bf16) made there.
#
#   scripts/gpu-check.sh BUNDLE      BUNDLE holds gpu_check and nvembed-tiny-a/ (the fixture)
#
# SHAPES (default medium,nv-embed-v2), DTYPE (bf16), DEVICE (cuda; `cpu` runs the same check on the
# CPU, which is how it is tested without a GPU) and WORK (/tmp/nvembed-gpu-check) override.
set -euo pipefail
bundle=${1:?usage: scripts/gpu-check.sh BUNDLE}
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cuda ]; then
  # CUDA 13 runtime libraries: those of the machine's PyTorch wheels, unless already on the path.
  nvidia=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__file__))' 2>/dev/null || true)
  for lib in "$nvidia"/*/lib "$nvidia"/cu13/lib; do
    [ -d "$lib" ] && LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  done
  export LD_LIBRARY_PATH
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
exec "$bundle/gpu_check" --fixture "$bundle/nvembed-tiny-a" --device "$DEVICE" \
  --shapes "${SHAPES:-medium,nv-embed-v2}" --dtype "${DTYPE:-bf16}" --work "${WORK:-/tmp/nvembed-gpu-check}"
