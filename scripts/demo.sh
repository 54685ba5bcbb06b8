#!/usr/bin/env bash
# The main job, end to end on a fresh Debian 12 machine: install what is needed, build,
# fetch and verify the default model, start a private system-like D-Bus bus and hearthd on
# it, and ask a real question with hearthctl (the answer streams as it is generated).
#
# Usage: scripts/demo.sh ["your question"]
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
QUESTION="${1:-In one sentence, why do phones need on-device AI?}"
cd "$ROOT"

./scripts/setup-deps.sh
[ -d "$HOME/.cargo/bin" ] && export PATH="$HOME/.cargo/bin:$PATH"
echo "demo: building (the first build compiles llama.cpp, about 5 minutes on 2 cores)"
cargo build --bins --quiet
./scripts/fetch-model.sh "$ROOT/models"

RUN="$(mktemp -d)"
cleanup() {
    [ -n "${DAEMON_PID:-}" ] && kill -TERM "$DAEMON_PID" 2>/dev/null && wait "$DAEMON_PID" 2>/dev/null || true
    [ -n "${BUS_PID:-}" ] && kill "$BUS_PID" 2>/dev/null || true
    rm -rf "$RUN"
}
trap cleanup EXIT

sed -e "s|@SOCKET@|$RUN/bus|" \
    -e "s|@POLICY@|$ROOT/dbus/data/org.hearth.Hearth1.conf|" \
    -e "s|@TEST_USER@|$(id -un)|" \
    tests/data/system-bus.conf.in > "$RUN/bus.conf"
dbus-daemon --config-file="$RUN/bus.conf" --nofork --print-address=3 3>"$RUN/address" 2>"$RUN/bus.log" &
BUS_PID=$!
for _ in $(seq 50); do [ -s "$RUN/address" ] && break; sleep 0.1; done
ADDRESS="$(head -n1 "$RUN/address")"
[ -n "$ADDRESS" ] || { echo "demo: dbus-daemon did not start:"; cat "$RUN/bus.log"; exit 1; }

cat > "$RUN/hearthd.toml" <<TOML
[daemon]
state_dir = "$RUN/state"

[models]
dirs = ["$ROOT/models"]
TOML
./target/debug/hearthd --config "$RUN/hearthd.toml" --bus-address "$ADDRESS" 2>"$RUN/hearthd.log" &
DAEMON_PID=$!
for _ in $(seq 300); do
    ./target/debug/hearthctl --bus-address "$ADDRESS" status >/dev/null 2>&1 && break
    kill -0 "$DAEMON_PID" 2>/dev/null || { echo "demo: hearthd exited:"; cat "$RUN/hearthd.log"; exit 1; }
    sleep 0.1
done

./target/debug/hearthctl --bus-address "$ADDRESS" status
echo
echo "Q: $QUESTION"
printf "A: "
./target/debug/hearthctl --bus-address "$ADDRESS" generate --max-tokens 128 "$QUESTION"
