#!/usr/bin/env bash
# Runs every check of the project on a fresh Debian 12 machine: installs what is needed,
# fetches and verifies the default model, builds, lints (clippy -D warnings), runs all unit
# and integration tests (the real hearthd on a private system-like bus with the real model),
# smoke-runs the benchmark so it cannot rot, checks the deployment files (systemd, D-Bus,
# polkit, SELinux), and boots the cross-built aarch64 image in QEMU (tests/qemu).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

./scripts/setup-deps.sh
[ -d "$HOME/.cargo/bin" ] && export PATH="$HOME/.cargo/bin:$PATH"
./scripts/fetch-model.sh "$ROOT/models"

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export RUST_BACKTRACE=1

echo "test: syntax of the shell scripts, formatting of the Rust code"
bash -n scripts/*.sh tests/qemu/*.sh .ci/run
cargo fmt --all --check

echo "test: building (integration tests run the built hearthd and hearthctl binaries)"
cargo build --workspace --bins --tests

echo "test: clippy -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "test: unit and integration tests"
# One test at a time: every test runs hearthd or llama.cpp with as many compute threads as
# there are cores, and ggml threads spin-wait, so parallel tests slow each other down 20x.
cargo test --workspace --quiet -- --test-threads=1

echo "test: benchmark smoke run"
./target/debug/hearth-bench --quick

echo "test: deployment (install tree, systemd unit verify + exposure, polkit, SELinux)"
./scripts/deploy-check.sh

echo "test: QEMU aarch64 (cross-build, busybox initramfs tier, systemd tier)"
./tests/qemu/run.sh

echo "test: all passed"
