#!/usr/bin/env bash
# `make cuda-check`: proves the model server's GPU build compiles, on a machine without a GPU:
# `cargo check -p nvembed-server --features cuda` against NVIDIA's CUDA wheels from PyPI (nvcc,
# nvvm, the runtime headers and CCCL, ~130 MB; kept under target/ and reused), compute
# capability 9.0 (H100/H200). About 12 minutes on 2 cores, most of it nvcc compiling candle's
# kernels. Not part of `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
# cudarc 0.19 accepts CUDA up to 13.4; a device running driver 580 wants 13.0 (NOTES.md).
CUDA_VERSION=${CUDA_VERSION:-13.4}
CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
root="$PWD/target/cuda-$CUDA_VERSION"
export CUDA_HOME="$root/nvidia/cu13"
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  rm -rf "$root/nvidia"
  mkdir -p "$root/wheels"
  python3 -m pip download -q -d "$root/wheels" "cuda-toolkit[nvcc,cudart,cccl]==$CUDA_VERSION.*"
  for wheel in "$root"/wheels/nvidia*.whl; do python3 -m zipfile -e "$wheel" "$root"; done
  # zipfile drops the executable bits.
  chmod +x "$CUDA_HOME"/bin/* "$CUDA_HOME"/nvvm/bin/*
fi
# Its own target directory: other builds need not wait for its lock, nor rebuild after its features.
export PATH="$CUDA_HOME/bin:$PATH" CUDA_COMPUTE_CAP CARGO_TARGET_DIR="$PWD/target/cuda-check"
nvcc --version | tail -n 2
time cargo check --release -p nvembed-server --no-default-features --features cuda
echo "cuda-check: the model server compiles with --features cuda (CUDA $CUDA_VERSION, compute capability $CUDA_COMPUTE_CAP)"
