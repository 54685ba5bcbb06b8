#!/usr/bin/env bash
# Builds the hearthd SELinux module with Debian's refpolicy devel Makefile, links it with the
# distribution's base policy (+ policykit, unprivuser) and expands the result, which enforces every
# neverallow against the whole policy, then checks the expanded policy with sesearch.
#
#   scripts/selinux-check.sh [--build-only]     output: target/selinux/{hearthd.pp,policy.bin}
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$ROOT/target/selinux"
POLICY_DIR=/usr/share/selinux/default
rm -rf "$OUT" && mkdir -p "$OUT"
cp "$ROOT"/selinux/hearthd.{te,fc,if} "$OUT/"
make -s -C "$OUT" -f /usr/share/selinux/devel/Makefile hearthd.pp >"$OUT/build.log" 2>&1 \
    || { cat "$OUT/build.log"; echo "selinux: module build failed" >&2; exit 1; }
echo "selinux: built $OUT/hearthd.pp"
[ "${1:-}" = "--build-only" ] && exit 0

for m in base policykit unprivuser; do bunzip2 -kc "$POLICY_DIR/$m.pp.bz2" >"$OUT/$m.pp"; done
semodule_link -o "$OUT/linked.pp" "$OUT/base.pp" "$OUT/policykit.pp" "$OUT/unprivuser.pp" "$OUT/hearthd.pp" >/dev/null
# Expanding checks every neverallow in the linked policy; a violation fails here.
semodule_expand "$OUT/linked.pp" "$OUT/policy.bin" 2>"$OUT/expand.log" \
    || { cat "$OUT/expand.log"; echo "selinux: expand (neverallow check) failed" >&2; exit 1; }
echo "selinux: linked with the distribution base policy and expanded; all neverallows hold"

fail=0
# A query that sesearch rejects (a type that does not exist) must fail, not read as "no rule".
search() { sesearch "$@" "$OUT/policy.bin" || { echo "selinux: sesearch $* failed" >&2; exit 1; }; }
expect() { # description, expected (yes/no), sesearch args...
    local what="$1" want="$2"; shift 2
    local got; got="$(search "$@")" || exit 1
    if { [ "$want" = yes ] && [ -n "$got" ]; } || { [ "$want" = no ] && [ -z "$got" ]; }; then
        echo "  ok   $what"
    else
        echo "  FAIL $what"; echo "$got" | sed 's/^/       /'; fail=1
    fi
}
connects="$(search -A -s hearthd_t -c tcp_socket -p name_connect)" || exit 1
connects="$(echo "$connects" | grep -oE ' [a-z_]+:tcp_socket' | sort -u | tr -d ' ' | tr '\n' ' ')"
echo "selinux: hearthd_t name_connect targets: ${connects:-none}"
[ "$connects" = "dns_port_t:tcp_socket http_port_t:tcp_socket " ] || { echo "  FAIL unexpected connect targets"; fail=1; }
expect "init runs /usr/libexec/hearthd as hearthd_t" yes -T -s init_t -t hearthd_exec_t -c process -D hearthd_t
expect "the engine opens GPU render nodes" yes -A -s hearthd_engine_t -t dri_device_t -c chr_file -p open
expect "the engine opens and maps accelerators" yes -A -s hearthd_engine_t -t hearthd_accel_device_t -c chr_file -p map
expect "hearthd_t itself opens no GPU render node" no -A -s hearthd_t -t dri_device_t -c chr_file -p open
expect "hearthd_t itself opens no accelerator" no -A -s hearthd_t -t hearthd_accel_device_t -c chr_file -p open
expect "hearthd_t maps model files" yes -A -s hearthd_t -t hearthd_model_t -c file -p map
expect "hearthd_t cannot write model files" no -A -s hearthd_t -t hearthd_model_t -c file -p write
expect "hearthd_t cannot write its configuration" no -A -s hearthd_t -t hearthd_conf_t -c file -p write
expect "hearthd_t talks to the system bus" yes -A -s hearthd_t -t system_dbusd_t -c dbus -p send_msg
expect "hearthd_t talks to polkit" yes -A -s hearthd_t -t policykit_t -c dbus -p send_msg
expect "hearthd_t sends sd_notify to init" yes -A -s hearthd_t -t init_t -c unix_dgram_socket -p sendto
expect "hearthd_t never listens on TCP" no -A -s hearthd_t -c tcp_socket -p listen
expect "hearthd_t binds no TCP ports" no -A -s hearthd_t -c tcp_socket -p name_bind
expect "hearthd_t has no capabilities" no -A -s hearthd_t -c capability
expect "hearthd_t executes nothing but itself" no -A -s hearthd_t -t bin_t -c file -p execute
expect "hearthd_t starts /usr/libexec/hearth-engine as hearthd_engine_t" yes -T -s hearthd_t -t hearthd_engine_exec_t -c process -D hearthd_engine_t
expect "hearthd_engine_t maps model files" yes -A -s hearthd_engine_t -t hearthd_model_t -c file -p map
expect "hearthd_engine_t cannot read the state directory (key, sessions)" no -A -s hearthd_engine_t -t hearthd_var_lib_t -c file -p read
expect "hearthd_engine_t makes no TCP socket" no -A -s hearthd_engine_t -c tcp_socket -p create
expect "hearthd_engine_t makes no unix socket" no -A -s hearthd_engine_t -c unix_stream_socket -p create
expect "hearthd_engine_t cannot talk to the bus" no -A -s hearthd_engine_t -t system_dbusd_t -c dbus -p send_msg
expect "hearthd_engine_t has no capabilities" no -A -s hearthd_engine_t -c capability
expect "hearthd_engine_t executes nothing" no -A -s hearthd_engine_t -t bin_t -c file -p execute
expect "user domains cannot open accelerators" no -A -s user_t -t hearthd_accel_device_t -c chr_file -p open
expect "user domains cannot read models" no -A -s user_t -t hearthd_model_t -c file -p read
[ "$fail" -eq 0 ] || { echo "selinux: checks failed" >&2; exit 1; }
echo "selinux: all checks passed"
