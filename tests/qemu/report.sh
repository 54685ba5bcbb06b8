# Sourced by the scripts that run inside the VMs (scenario.sh, tier2-check.sh): how results
# reach the host. Every line goes to the serial console as "@@hearth <step> <line>", which
# tests/tests/qemu.rs parses.
#
# step NAME CMD...: CMD's stdout and stderr, each line prefixed, then "rc=N", its exit status.
step() {
    name="$1"
    shift
    { "$@" 2>&1; echo "rc=$?"; } | while IFS= read -r line; do echo "@@hearth $name $line"; done
}
