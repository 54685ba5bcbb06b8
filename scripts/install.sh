#!/usr/bin/env bash
# Installs Hearth into a root file system tree, as a distribution package would:
#
#   scripts/install.sh [--destdir DIR] [--prefix /usr] [--profile release|debug]
#                      [--target TRIPLE] [--strip] [--with-model]
#
# DESTDIR (default: none, i.e. /) is the staging root; PREFIX is where /usr goes. The binaries
# come from target/<profile> (build them first: `make` does), or target/TRIPLE/<profile> for a
# cross-built image (tests/qemu/build.sh installs aarch64 builds this way). --strip drops the
# binaries' symbols and debug lines, with $STRIP (default strip; a cross image sets its own). --with-model also installs the
# default model from ./models into PREFIX/share/hearth/models (scripts/fetch-model.sh first).
# Modes: everything root-owned and read-only to the service (README, "Deploying");
# /var/lib/hearth comes from systemd (StateDirectory=, tmpfiles.d).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DESTDIR="${DESTDIR:-}"
PREFIX="${PREFIX:-/usr}"
PROFILE="${PROFILE:-release}"
TARGET=""
STRIP_BIN=0
WITH_MODEL=0
while [ $# -gt 0 ]; do
    case "$1" in
        --destdir) DESTDIR="$2"; shift 2 ;;
        --prefix) PREFIX="$2"; shift 2 ;;
        --profile) PROFILE="$2"; shift 2 ;;
        --target) TARGET="$2"; shift 2 ;;
        --strip) STRIP_BIN=1; shift ;;
        --with-model) WITH_MODEL=1; shift ;;
        *) echo "install: unknown argument $1" >&2; exit 2 ;;
    esac
done
BIN="$ROOT/target/${TARGET:+$TARGET/}$PROFILE"
for b in hearthd hearth-engine hearthctl; do
    [ -x "$BIN/$b" ] || { echo "install: $BIN/$b is missing: build it first (make, or cargo build --profile $PROFILE)" >&2; exit 1; }
done

# install(1) with an explicit mode and root ownership where we may set it.
own=()
[ "$(id -u)" -eq 0 ] && own=(-o root -g root)
put() { # mode source destination
    install -D -m "$1" "${own[@]}" "$2" "$DESTDIR$3"
}
dir() { # mode directory
    install -d -m "$1" "${own[@]}" "$DESTDIR$2"
}

put 0755 "$BIN/hearthd"                                 "$PREFIX/libexec/hearthd"
put 0755 "$BIN/hearth-engine"                           "$PREFIX/libexec/hearth-engine"
put 0755 "$BIN/hearthctl"                               "$PREFIX/bin/hearthctl"
if [ "$STRIP_BIN" -eq 1 ]; then
    "${STRIP:-strip}" "$DESTDIR$PREFIX/libexec/hearthd" "$DESTDIR$PREFIX/libexec/hearth-engine" "$DESTDIR$PREFIX/bin/hearthctl"
fi
put 0644 "$ROOT/daemon/data/hearthd.toml"               "$PREFIX/share/hearth/hearthd.toml"
dir 0755                                                "$PREFIX/share/hearth/models"
put 0644 "$ROOT/dbus/data/org.hearth.Hearth1.conf"      "$PREFIX/share/dbus-1/system.d/org.hearth.Hearth1.conf"
put 0644 "$ROOT/dbus/data/org.hearth.Hearth1.service"   "$PREFIX/share/dbus-1/system-services/org.hearth.Hearth1.service"
put 0644 "$ROOT/dbus/data/org.hearth.Hearth1.xml"       "$PREFIX/share/dbus-1/interfaces/org.hearth.Hearth1.xml"
put 0644 "$ROOT/dbus/data/org.hearth.Hearth1.policy"    "$PREFIX/share/polkit-1/actions/org.hearth.Hearth1.policy"
put 0644 "$ROOT/systemd/hearthd.service"                "$PREFIX/lib/systemd/system/hearthd.service"
# The per-user OpenAI-compatible bridge, where it was built (the phone image leaves it out).
if [ -x "$BIN/hearth-openai" ]; then
    put 0755 "$BIN/hearth-openai"                       "$PREFIX/bin/hearth-openai"
    [ "$STRIP_BIN" -eq 1 ] && "${STRIP:-strip}" "$DESTDIR$PREFIX/bin/hearth-openai"
    put 0644 "$ROOT/systemd/user/hearth-openai.socket"  "$PREFIX/lib/systemd/user/hearth-openai.socket"
    put 0644 "$ROOT/systemd/user/hearth-openai.service" "$PREFIX/lib/systemd/user/hearth-openai.service"
else
    echo "install: $BIN/hearth-openai is not built: the OpenAI-compatible bridge is left out" >&2
fi
put 0644 "$ROOT/systemd/hearth.sysusers"                "$PREFIX/lib/sysusers.d/hearth.conf"
put 0644 "$ROOT/systemd/hearth.tmpfiles"                "$PREFIX/lib/tmpfiles.d/hearth.conf"
put 0644 "$ROOT/systemd/hearthd-cloud.conf.example"     "$PREFIX/share/doc/hearth/hearthd-cloud.conf.example"
put 0644 "$ROOT/README.md"                              "$PREFIX/share/doc/hearth/README.md"
put 0644 "$ROOT/LICENSE"                                "$PREFIX/share/doc/hearth/LICENSE"
for f in hearthd.te hearthd.fc hearthd.if; do
    put 0644 "$ROOT/selinux/$f"                         "$PREFIX/share/selinux/devel/include/contrib/$f"
done
if [ -f "$ROOT/target/selinux/hearthd.pp" ]; then
    put 0644 "$ROOT/target/selinux/hearthd.pp"          "$PREFIX/share/selinux/packages/hearthd.pp"
fi
dir 0755 /etc/hearth
dir 0755 /etc/hearth/apps.d
if [ "$WITH_MODEL" -eq 1 ]; then
    for f in "$ROOT"/models/*.toml "$ROOT"/models/*.gguf; do
        put 0644 "$f" "$PREFIX/share/hearth/models/$(basename "$f")"
    done
fi
echo "install: Hearth installed into ${DESTDIR:-/} (prefix $PREFIX, $PROFILE binaries)"
