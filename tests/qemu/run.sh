#!/usr/bin/env bash
# The QEMU aarch64 integration tests (called by scripts/test.sh): builds the cross-compiled
# binaries and the images (build.sh; cached in target/qemu), then boots both tiers. Each VM
# has a hard time limit; a failure prints the tail of its serial log.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
start=$(date +%s)
"$ROOT/tests/qemu/build.sh"
built=$(date +%s)
cd "$ROOT"
cargo test --quiet --workspace --test qemu -- --ignored --test-threads=1 --nocapture
echo "qemu: images built in $((built - start)) s, both tiers booted and checked in $(( $(date +%s) - built )) s"
