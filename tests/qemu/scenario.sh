#!/bin/sh
# The scenario both tiers run against the live hearthd on the system bus, with hearthctl as an
# app (uid 1000, in an app scope, as a phone shell launches apps): status, models, a streamed
# greedy generation, a cancel, bad requests, and status again (the daemon still serves).
# Output: "@@hearth <step> <line>" for every line of every step, then "@@hearth <step> rc=N".
# HEARTH_TIER=1: no systemd, the scope is made by hand; 2: systemd-run makes it.
set -u
PROMPT="What is the capital of France?"
MAX_TOKENS=12
n=0

as_app() {
    n=$((n + 1))
    if [ "$HEARTH_TIER" = 1 ]; then
        cg="/sys/fs/cgroup/app.slice/app-org.hearth.QemuCheck-$n.scope"
        mkdir -p "$cg"
        (echo 0 > "$cg/cgroup.procs" && exec /usr/bin/setpriv --reuid=app --regid=app --clear-groups "$@")
    else
        systemd-run --quiet --scope --uid=app --gid=app --unit="app-org.hearth.QemuCheck-$n.scope" -- "$@"
    fi
}
. /usr/share/hearth-qemu/report.sh  # step
uptime_s() { cut -d' ' -f1 /proc/uptime; }

# The first call may find the name not yet owned (tier 1) or activate hearthd (tier 2).
echo "@@hearth first-call uptime=$(uptime_s)"
ok=0
for _ in $(seq 1 60); do
    if as_app /usr/bin/hearthctl status > /dev/null 2>&1; then ok=1; break; fi
    # Tier 1 started hearthd itself: no point waiting for one that exited.
    if [ -f /run/hearthd.pid ] && ! kill -0 "$(cat /run/hearthd.pid)" 2> /dev/null; then break; fi
    sleep 1
done
echo "@@hearth serving ok=$ok uptime=$(uptime_s)"
step status as_app /usr/bin/hearthctl --json status
step whoami as_app /usr/bin/hearthctl --json whoami
step models as_app /usr/bin/hearthctl --json models
echo "@@hearth prompt $PROMPT"
echo "@@hearth max-tokens $MAX_TOKENS"
# Every streamed line carries the guest's uptime when it arrived.
echo "@@hearth generate-start uptime=$(uptime_s)"
{ as_app /usr/bin/hearthctl --json generate "$PROMPT" --temperature 0 --max-tokens "$MAX_TOKENS" 2>&1; echo "rc=$?"; } |
    while IFS= read -r line; do echo "@@hearth generate $(uptime_s) $line"; done

# Cancel: a long request, interrupted (SIGINT: hearthctl calls Cancel) once two tokens came.
as_app /usr/bin/hearthctl --json generate "Write a long story about a lighthouse keeper." \
    --max-tokens 400 > /tmp/cancel.out 2>&1 &
pid=$!
for _ in $(seq 1 600); do
    [ "$(grep -c '"token_id"' /tmp/cancel.out)" -ge 2 ] && break
    sleep 0.1
done
/usr/bin/pkill -INT -f 'lighthouse keeper'
wait "$pid"
echo "rc=$?" >> /tmp/cancel.out
sed 's/^/@@hearth cancel /' /tmp/cancel.out

step bad-temperature as_app /usr/bin/hearthctl generate "hello" --temperature=-1
step bad-model as_app /usr/bin/hearthctl generate "hello" --model no-such-model
step status-after as_app /usr/bin/hearthctl --json status
step models-after as_app /usr/bin/hearthctl --json models
