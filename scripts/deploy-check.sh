#!/usr/bin/env bash
# Checks what an integrator installs: the staged tree (scripts/install.sh into target/stage),
# the systemd unit (verify, and a security exposure of at most 1.2), the D-Bus and polkit
# files, and the SELinux module (scripts/selinux-check.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
STAGE="$ROOT/target/stage"
MAX_EXPOSURE="1.2"

# The SELinux module first: the install ships the built hearthd.pp.
./scripts/selinux-check.sh
rm -rf "$STAGE"
./scripts/install.sh --destdir "$STAGE" --profile debug --with-model >/dev/null
# Modes as on a device: nothing the service reads is writable by others.
bad="$(find "$STAGE" \( -type f -o -type d \) -perm /022 -printf '%m %p\n')"
[ -z "$bad" ] || { echo "deploy: group/other-writable files in the install:"; echo "$bad"; exit 1; }
echo "deploy: installed tree has no group/other-writable files"

# systemd-analyze verify, with ExecStart pointed at the staged binary (the rest of the unit as
# installed, checked against this machine's systemd units).
unit="$STAGE/usr/lib/systemd/system/hearthd.service"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
sed "s|^ExecStart=/usr/libexec/hearthd|ExecStart=$STAGE/usr/libexec/hearthd|" "$unit" >"$tmp/hearthd.service"
systemd-analyze verify "$tmp/hearthd.service"
echo "deploy: systemd-analyze verify clean"
# The user units of the OpenAI-compatible bridge, with the staged binary.
for u in hearth-openai.socket hearth-openai.service; do
    sed "s|^ExecStart=/usr/bin/hearth-openai|ExecStart=$STAGE/usr/bin/hearth-openai|" \
        "$STAGE/usr/lib/systemd/user/$u" >"$tmp/$u"
done
mkdir -p -m 0700 "$tmp/run"
XDG_RUNTIME_DIR="$tmp/run" systemd-analyze --user verify "$tmp/hearth-openai.socket" "$tmp/hearth-openai.service"
echo "deploy: the bridge's user units verify clean"

report="$(systemd-analyze security --offline=true "$unit" 2>&1)"
exposure="$(echo "$report" | sed -n 's/.*Overall exposure level for hearthd.service: \([0-9.]*\).*/\1/p')"
[ -n "$exposure" ] || { echo "$report"; echo "deploy: no exposure level in the report" >&2; exit 1; }
if awk -v e="$exposure" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e <= m) }'; then
    echo "deploy: systemd-analyze security exposure $exposure (limit $MAX_EXPOSURE)"
else
    echo "$report" | grep -v '✓'
    echo "deploy: exposure $exposure is above $MAX_EXPOSURE" >&2
    exit 1
fi

xmllint --noout --dtdvalid /usr/share/polkit-1/policyconfig-1.dtd \
    "$STAGE/usr/share/polkit-1/actions/org.hearth.Hearth1.policy"
pkaction_ids="$(grep -o 'action id="[^"]*"' "$STAGE/usr/share/polkit-1/actions/org.hearth.Hearth1.policy" | wc -l)"
echo "deploy: polkit policy valid against policyconfig-1.dtd ($pkaction_ids actions)"
# Debian ships no D-Bus DTDs: the policy is loaded by a real dbus-daemon in the installed-tree
# test (tests/tests/deployment.rs) and the interface is compared with the live daemon
# (tests/tests/introspection.rs); here they must at least be well-formed.
xmllint --noout "$STAGE/usr/share/dbus-1/system.d/org.hearth.Hearth1.conf" \
    "$STAGE/usr/share/dbus-1/interfaces/org.hearth.Hearth1.xml"
echo "deploy: D-Bus policy and interface are well-formed XML"
activation="$STAGE/usr/share/dbus-1/system-services/org.hearth.Hearth1.service"
for line in "Name=org.hearth.Hearth1" "Exec=/bin/false" "User=hearth" "SystemdService=hearthd.service"; do
    grep -qx "$line" "$activation" || { echo "deploy: $activation lacks $line" >&2; exit 1; }
done
echo "deploy: D-Bus activation hands over to systemd"
