#!/bin/busybox sh
# Tier 1's PID 1: mounts the kernel file systems, starts the system bus with the project's
# policy and hearthd as the unprivileged hearth user, runs the scenario, powers off. Every
# line for the host starts with "@@hearth ". Busybox's shell runs its own applets before PATH:
# tools from Debian's packages (util-linux setpriv, procps pkill) are called by full path.
/bin/busybox --install -s
export PATH=/usr/bin:/bin:/usr/sbin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo "@@hearth boot uptime=$(cut -d' ' -f1 /proc/uptime)"
fail() { echo "@@hearth fatal $*"; poweroff -f; }

mkdir -p /run/dbus /var/lib/hearth
chown hearth:hearth /var/lib/hearth && chmod 0700 /var/lib/hearth
dbus-daemon --system --fork || fail "dbus-daemon did not start"

# hearthd in its own cgroup, as systemd would put it, so its memory.pressure is its own.
cg=/sys/fs/cgroup/system.slice/hearthd.service
mkdir -p "$cg"
(
    echo 0 > "$cg/cgroup.procs"
    exec /usr/bin/setpriv --reuid=hearth --regid=hearth --init-groups /usr/libexec/hearthd > /tmp/hearthd.log 2>&1
) &
echo "$!" > /run/hearthd.pid

HEARTH_TIER=1 /usr/share/hearth-qemu/scenario.sh
sed 's/^/@@hearth hearthd-log /' /tmp/hearthd.log
echo "@@hearth done"
poweroff -f
