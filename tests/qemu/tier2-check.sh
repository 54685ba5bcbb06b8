#!/bin/sh
# Tier 2's check, run by hearth-qemu-check.service once the system is up: hearthd must not be
# running yet; the scenario's first call D-Bus-activates it; then what systemd knows of it
# (state, watchdog, user, journal, its private /dev), and power off.
set -u
. /usr/share/hearth-qemu/report.sh  # step
echo "@@hearth boot uptime=$(cut -d' ' -f1 /proc/uptime)"
step before systemctl is-active hearthd.service
HEARTH_TIER=2 /usr/share/hearth-qemu/scenario.sh
# The watchdog: hearthd pings every WatchdogSec/2 once its engines answer; wait for one.
for _ in $(seq 1 40); do
    [ "$(systemctl show -P WatchdogTimestampMonotonic hearthd.service)" != 0 ] && break
    sleep 1
done
step show systemctl show hearthd.service \
    -p ActiveState -p SubState -p Type -p NRestarts -p User -p WatchdogUSec \
    -p WatchdogTimestampMonotonic -p StatusText -p MainPID
step systemctl-status systemctl status --no-pager --lines=0 hearthd.service
pid="$(systemctl show -P MainPID hearthd.service)"
step uid sh -c "grep -E '^(Uid|Gid|NoNewPrivs|CapEff|Seccomp|Seccomp_filters):' /proc/$pid/status"
# The engine: hearthd's child, sandboxed further (seccomp allowlist, landlock), as the
# kernel sees it and as the engine reported its own attempts (ListModels).
engine="$(grep -l "^PPid:[[:space:]]*$pid\$" /proc/[0-9]*/status 2>/dev/null | head -n1 | cut -d/ -f3)"
step engine sh -c "grep -E '^(Name|PPid|Uid|NoNewPrivs|CapEff|Seccomp|Seccomp_filters):' /proc/$engine/status"
step engine-sandbox /usr/bin/hearthctl --json models
# PrivateDevices=yes: the service's /dev has the pseudo devices and no disk.
step private-dev ls "/proc/$pid/root/dev"
step journal journalctl --no-pager -o cat -u hearthd.service
echo "@@hearth done"
systemctl poweroff --no-block
