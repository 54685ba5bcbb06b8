#!/bin/sh
# Builds llama.cpp's own llama-server and llama-bench, the peers hearth-bench compares
# against, from the llama-cpp-python sdist on PyPI (its vendor/llama.cpp carries the tools
# that llama-cpp-sys-2's crate leaves out). Idempotent: the binaries are kept in
# target/llama-tools/bin and rebuilt only when the pinned version changes.
#
# With --vulkan or --cuda, llama-bench alone, built with that ggml backend into
# target/llama-tools-vulkan or target/llama-tools-cuda (the peer of hearth-bench's GPU
# section, HEARTH_LLAMA_BENCH_GPU): Vulkan needs scripts/setup-deps.sh's packages and the
# target/vulkan-sdk headers, CUDA the toolkit (scripts/gpu-check.sh).
#
# Usage: tests/tools/build-llama-tools.sh [--vulkan | --cuda]   (prints the bin directory)
set -eu
VERSION=0.3.36
BUILD=2  # bump when the cmake options change
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DIR="$ROOT/target/llama-tools"
TARGETS="llama-server llama-bench"
BACKEND=""
case "${1:-}" in
    --vulkan)
        DIR="$ROOT/target/llama-tools-vulkan"
        TARGETS="llama-bench"
        BACKEND="-DGGML_VULKAN=ON"
        export VULKAN_SDK="$ROOT/target/vulkan-sdk"
        ;;
    --cuda)
        DIR="$ROOT/target/llama-tools-cuda"
        TARGETS="llama-bench"
        BACKEND="-DGGML_CUDA=ON"
        ;;
    "") ;;
    *) echo "usage: $0 [--vulkan | --cuda]" >&2; exit 2 ;;
esac
BIN="$DIR/bin"
built=1
for t in $TARGETS; do [ -x "$BIN/$t" ] || built=0; done
if [ "$built" = 1 ] && [ "$(cat "$DIR/version" 2>/dev/null)" = "$VERSION.$BUILD" ]; then
    echo "$BIN"
    exit 0
fi
mkdir -p "$DIR"
SDIST="$DIR/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
    python3 -m pip download --quiet --no-deps --no-binary :all: -d "$DIR" "llama-cpp-python==$VERSION" >&2
fi
rm -rf "$DIR/src" "$DIR/build"
mkdir -p "$DIR/src"
tar -xzf "$SDIST" -C "$DIR/src" --strip-components=1
# Release build, the CPU backend (and the GPU one asked for), like the engine's; OpenMP as llama.cpp's default build
# has it where the compiler provides it. Without AMX, as .cargo/config.toml builds the
# engine's ggml: a VM that lists AMX may not let a process use it (SIGSEGV in
# ggml_backend_amx_mul_mat on the first prompt), and the peers must run the same kernels.
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
case "$(uname -m)" in x86_64) ;; *) NO_AMX="" ;; esac
cmake -S "$DIR/src/vendor/llama.cpp" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX" \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DBUILD_SHARED_LIBS=OFF $BACKEND >&2
# shellcheck disable=SC2086 # TARGETS is a list
cmake --build "$DIR/build" --target $TARGETS -j "$(nproc)" >&2
mkdir -p "$BIN"
for t in $TARGETS; do cp "$DIR/build/bin/$t" "$BIN/"; done
echo "$VERSION.$BUILD" > "$DIR/version"
echo "$BIN"
