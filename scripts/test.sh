#!/usr/bin/env bash
# Runs every check of the project on a fresh Debian 12 machine: installs what is needed,
# fetches and verifies the default model, builds, lints (clippy -D warnings), runs all unit
# and integration tests (the real hearthd on a private system-like bus with the real model),
# smoke-runs the benchmark so it cannot rot, checks the deployment files (systemd, D-Bus,
# polkit, SELinux), boots the cross-built aarch64 image in QEMU (tests/qemu), and runs the
# Vulkan build of the engine on Mesa's lavapipe (a real Vulkan driver on the CPU).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

./scripts/setup-deps.sh
[ -d "$HOME/.cargo/bin" ] && export PATH="$HOME/.cargo/bin:$PATH"
./scripts/fetch-model.sh "$ROOT/models"

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export RUST_BACKTRACE=1
# A clean checkout builds everything once: cargo's incremental caches (about 2 GB here) would
# only take disk. Local runs keep them, so a rerun after an edit stays quick.
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL=0; fi
# Free disk where the build goes, at each step: a full run takes up to ~4.2 GB in target/ (the
# host build, the aarch64 cross build of llama.cpp, the QEMU images) and a compiler that runs
# out of space fails far from the cause.
disk() { echo "test: disk: $(df -h --output=avail "$ROOT/target" 2>/dev/null | tail -1 | tr -d ' ') free, target/ $(du -sh "$ROOT/target" 2>/dev/null | cut -f1)"; }
mkdir -p "$ROOT/target"
disk

echo "test: syntax of the shell scripts, formatting of the Rust code"
bash -n scripts/*.sh tests/qemu/*.sh tests/tools/*.sh clients/glib/*.sh .ci/run
cargo fmt --all --check

echo "test: building (integration tests run the built hearthd and hearthctl binaries)"
cargo build --workspace --bins --tests

disk
echo "test: clippy -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "test: unit and integration tests"
# One test at a time: every test runs hearthd or llama.cpp with as many compute threads as
# there are cores, and ggml threads spin-wait, so parallel tests slow each other down 20x.
cargo test --workspace --quiet -- --test-threads=1

disk
echo "test: benchmark smoke run"
./target/debug/hearth-bench --quick

disk
echo "test: deployment (install tree, systemd unit verify + exposure, polkit, SELinux)"
./scripts/deploy-check.sh

disk
echo "test: QEMU aarch64 (cross-build, busybox initramfs tier, systemd tier)"
./tests/qemu/run.sh

disk
echo "test: the Vulkan engine on Mesa's lavapipe (tests/tests/gpu.rs)"
# VULKAN_SDK only for these commands: the CPU build of llama.cpp must not see it change.
vk() { env VULKAN_SDK="$ROOT/target/vulkan-sdk" "$@"; }
started=$(date +%s)
vk cargo build -p hearthd --bins --features vulkan
echo "test: hearthd with the vulkan feature built in $(( $(date +%s) - started )) s"
vk cargo clippy -p hearthd -p hearth-tests --all-targets --quiet --features hearthd/vulkan,hearth-tests/vulkan -- -D warnings
vk cargo test -p hearth-tests --features vulkan --test gpu -- --test-threads=1 --nocapture
# The CPU build's binaries back in target/debug for whatever runs next.
cargo build -p hearthd --bins --quiet

disk
echo "test: all passed"
