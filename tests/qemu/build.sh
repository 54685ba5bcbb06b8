#!/usr/bin/env bash
# Builds what the QEMU aarch64 tests boot, into target/qemu/ (ignored; every download is
# cached there, keyed by what it depends on):
#
#   1. hearthd and hearthctl cross-built for aarch64-unknown-linux-gnu (llama.cpp included,
#      through llama-cpp-sys-2's CMake build with Debian's aarch64 cross toolchain);
#   2. Debian arm64 packages (kernel, busybox, dbus, systemd...) fetched and unpacked by
#      mmdebstrap from Debian's archive: tests/qemu/packages lists them;
#   3. tier 1: an initramfs with busybox, dbus-daemon, hearthd, hearthctl, the shared libraries
#      they need (found by walking their ELF NEEDED entries through the unpacked packages), the
#      project's bus policy, the default model and a simulated phone's sysfs tree;
#   4. tier 2: a Debian root file system with systemd, Hearth installed by scripts/install.sh,
#      as an ext4 image, and the small initramfs that mounts it (virtio and ext4 are modules
#      in Debian's kernel).
#
# Needs: scripts/setup-deps.sh (cross toolchain, qemu-system-arm, mmdebstrap, the aarch64
# Rust target), the default model in ./models, and the host build of hearth-soc-tree.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
HERE="$ROOT/tests/qemu"
OUT="$ROOT/target/qemu"
TRIPLE=aarch64-unknown-linux-gnu
MIRROR="${HEARTH_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm
mkdir -p "$OUT"
log() { echo "qemu-build: $*"; }

# --- 1. cross-build ------------------------------------------------------------------------
log "cross-building hearthd and hearthctl for $TRIPLE"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
export STRIP=aarch64-linux-gnu-strip  # install.sh --strip
(cd "$ROOT" && cargo build --quiet --profile image --target "$TRIPLE" -p hearthd -p hearthctl)

# --- 2. Debian arm64 packages --------------------------------------------------------------
mapfile -t PACKAGES < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' -e 's/[[:space:]]//g' "$HERE/packages")
KEY="$(printf '%s\n' merged-usr "$SUITE" "$MIRROR" "${PACKAGES[@]}" | sha256sum | cut -c1-16)"
DEB="$OUT/debian-arm64"
# The unpacked tree is the cache (keyed by DEB.key); the tarball mmdebstrap writes is streamed
# into it, never kept (it would take another 450 MB).
if [ "$(cat "$DEB.key" 2>/dev/null)" != "$KEY" ]; then
    log "fetching Debian $SUITE arm64 packages with mmdebstrap: ${PACKAGES[*]}"
    rm -rf "$DEB" "$DEB.key" "$DEB.part" "$OUT"/debian-arm64-*.tar && mkdir -p "$DEB.part"
    # extract: packages (and what they depend on) are unpacked, no maintainer script runs, so
    # no arm64 emulation is needed on the host; what the scripts would do is done below.
    # setup00.sh makes /bin, /lib, /sbin links into /usr first (merged /usr, as bookworm has).
    mmdebstrap --quiet --variant=extract --architectures=arm64 --format=tar \
        --setup-hook=/usr/share/mmdebstrap/hooks/merged-usr/setup00.sh \
        --include="$(IFS=,; echo "${PACKAGES[*]}")" \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        "$SUITE" - "$MIRROR" | tar -x -C "$DEB.part" --exclude='./dev/*'
    # The kernel package's postinst would have run depmod: modules.dep for modprobe.
    /sbin/depmod -b "$DEB.part" "$(basename "$(ls -d "$DEB.part"/lib/modules/*)")"
    mv "$DEB.part" "$DEB"
    echo "$KEY" > "$DEB.key"
fi
KVER="$(basename "$(ls -d "$DEB"/lib/modules/*)")"
cp "$DEB/boot/vmlinuz-$KVER" "$OUT/vmlinuz"

# --- helpers -------------------------------------------------------------------------------
LIBDIRS=(lib/aarch64-linux-gnu usr/lib/aarch64-linux-gnu lib usr/lib usr/lib/aarch64-linux-gnu/systemd)
needed() { readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'; }
interp() { readelf -l "$1" | sed -n 's/.*Requesting program interpreter: \(.*\)\]/\1/p'; }
# copy_elf STAGE FILE DEST: FILE to STAGE/DEST (unless it is there already), then every shared
# library it needs, by soname, from the unpacked packages into STAGE/lib/aarch64-linux-gnu
# (glibc's default search path).
copy_elf() {
    local stage="$1" file="$2" dest="$3"
    [ -e "$stage$dest" ] || install -D -m 0755 "$file" "$stage$dest"
    local loader
    loader="$(interp "$file")"
    if [ -n "$loader" ] && [ ! -e "$stage$loader" ]; then
        install -D -m 0755 "$(readlink -f "$DEB$loader")" "$stage$loader"
    fi
    local queue=("$file") seen=" " lib d found
    while [ "${#queue[@]}" -gt 0 ]; do
        local elf="${queue[0]}"
        queue=("${queue[@]:1}")
        for lib in $(needed "$elf"); do
            case "$seen" in *" $lib "*) continue ;; esac
            seen="$seen$lib "
            [ -e "$stage/lib/aarch64-linux-gnu/$lib" ] && continue
            found=""
            for d in "${LIBDIRS[@]}"; do
                if [ -e "$DEB/$d/$lib" ]; then found="$DEB/$d/$lib"; break; fi
            done
            [ -n "$found" ] || { echo "qemu-build: $lib (needed by $elf) is in no unpacked package" >&2; exit 1; }
            install -D -m 0755 "$(readlink -f "$found")" "$stage/lib/aarch64-linux-gnu/$lib"
            queue+=("$found")
        done
    done
}
# cpio_of DIR ARCHIVE: a newc archive of DIR, every entry owned by root.
cpio_of() {
    (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) > "$2.part"
    mv "$2.part" "$2"
}
# Accounts both tiers know before any package script or systemd-sysusers runs.
write_accounts() {
    local etc="$1/etc"
    mkdir -p "$etc"
    cat > "$etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
messagebus:x:100:101::/nonexistent:/usr/sbin/nologin
hearth:x:990:990:Hearth on-device AI service:/var/lib/hearth:/usr/sbin/nologin
app:x:1000:1000:an app:/home/app:/bin/sh
EOF
    cat > "$etc/group" <<'EOF'
root:x:0:
messagebus:x:101:
render:x:105:hearth
hearth:x:990:
app:x:1000:
EOF
}

SOC_TREE="$ROOT/target/debug/hearth-soc-tree"
[ -x "$SOC_TREE" ] || (cd "$ROOT" && cargo build --quiet --workspace --bins)

# --- 3. tier 1 initramfs -------------------------------------------------------------------
log "assembling the tier 1 initramfs"
T1="$OUT/tier1"
rm -rf "$T1" && mkdir -p "$T1"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,run,tmp,var/lib,etc/hearth}
ln -s ../run "$T1/var/run"
"$ROOT/scripts/install.sh" --destdir "$T1" --target "$TRIPLE" --profile image --strip --with-model > /dev/null
copy_elf "$T1" "$T1/usr/libexec/hearthd" /usr/libexec/hearthd
copy_elf "$T1" "$T1/usr/libexec/hearth-engine" /usr/libexec/hearth-engine
copy_elf "$T1" "$T1/usr/bin/hearthctl" /usr/bin/hearthctl
copy_elf "$T1" "$DEB/bin/busybox" /bin/busybox
copy_elf "$T1" "$DEB/usr/bin/dbus-daemon" /usr/bin/dbus-daemon
copy_elf "$T1" "$DEB/usr/bin/setpriv" /usr/bin/setpriv
copy_elf "$T1" "$DEB/usr/bin/pkill" /usr/bin/pkill
install -D -m 0644 "$DEB/usr/share/dbus-1/system.conf" "$T1/usr/share/dbus-1/system.conf"
write_accounts "$T1"
"$SOC_TREE" "$T1/usr/share/hearth-qemu/sysfs"
install -m 0644 "$HERE/hearthd-vm.toml" "$T1/etc/hearth/hearthd.toml"
install -m 0755 "$HERE/tier1-init.sh" "$T1/init"
install -m 0755 "$HERE/scenario.sh" "$T1/usr/share/hearth-qemu/scenario.sh"
install -m 0644 "$HERE/report.sh" "$T1/usr/share/hearth-qemu/report.sh"
cpio_of "$T1" "$OUT/tier1.cpio"
rm -rf "$T1"  # the archive is what boots

# --- 4. tier 2 root file system and its initramfs -------------------------------------------
log "assembling the tier 2 root file system"
T2="$OUT/tier2-root"
rm -rf "$T2" && cp -a "$DEB" "$T2"
# What the skipped maintainer scripts would have left: base-passwd's account files (systemd-
# sysusers adds messagebus and hearth at boot, from the packages' and Hearth's sysusers.d),
# an empty machine-id (systemd writes one on first boot), the default target.
cp "$T2/usr/share/base-passwd/passwd.master" "$T2/etc/passwd"
cp "$T2/usr/share/base-passwd/group.master" "$T2/etc/group"
echo 'root::0:0:99999:7:::' > "$T2/etc/shadow"
: > "$T2/etc/machine-id"
echo hearth-phone > "$T2/etc/hostname"
"$ROOT/scripts/install.sh" --destdir "$T2" --target "$TRIPLE" --profile image --strip --with-model > /dev/null
"$SOC_TREE" "$T2/usr/share/hearth-qemu/sysfs"
install -m 0644 "$HERE/hearthd-vm.toml" "$T2/etc/hearth/hearthd.toml"
install -D -m 0755 "$HERE/scenario.sh" "$T2/usr/share/hearth-qemu/scenario.sh"
install -m 0644 "$HERE/report.sh" "$T2/usr/share/hearth-qemu/report.sh"
install -D -m 0755 "$HERE/tier2-check.sh" "$T2/usr/share/hearth-qemu/tier2-check.sh"
install -D -m 0644 "$HERE/hearth-qemu-check.service" "$T2/etc/systemd/system/hearth-qemu-check.service"
# The app the scenario runs as (systemd-sysusers creates it at boot).
mkdir -p "$T2/etc/sysusers.d"
echo 'u app 1000 "an app" /home/app /bin/sh' > "$T2/etc/sysusers.d/hearth-qemu.conf"
[ -L "$T2/var/run" ] || { rm -rf "$T2/var/run" && ln -s ../run "$T2/var/run"; }
[ -e "$T2/bin/sh" ] || ln -s dash "$T2/bin/sh"
# The units a package's postinst would enable (the bus), and the check, which runs once the
# system is up. hearthd.service is not enabled: the check's first call activates it.
systemctl --root="$T2" --quiet set-default multi-user.target
systemctl --root="$T2" --quiet enable dbus.socket hearth-qemu-check.service
# The serial console is the test's channel: no getty on it.
systemctl --root="$T2" --quiet mask serial-getty@ttyAMA0.service getty@tty1.service
rm -f "$OUT/tier2.img"
mkfs.ext4 -q -F -L hearth-root -E root_owner=0:0 -d "$T2" "$OUT/tier2.img" 1536M
rm -rf "$T2"  # the image is what boots

log "assembling the tier 2 initramfs (modules for the virtio disk and ext4)"
I2="$OUT/tier2-initrd"
rm -rf "$I2" && mkdir -p "$I2"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,newroot}
copy_elf "$I2" "$DEB/bin/busybox" /bin/busybox
MODDIR="lib/modules/$KVER"
mkdir -p "$I2/$MODDIR"
cp "$DEB/$MODDIR"/modules.{dep,alias,builtin,order} "$I2/$MODDIR/" 2>/dev/null || true
# The modules the root disk needs (ext4 asks for crc32c by alias), with what modules.dep
# says they depend on; the initramfs loads them in this order.
ROOT_MODULES=(virtio_pci virtio_blk crc32c_generic ext4)
printf '%s\n' "${ROOT_MODULES[@]}" > "$I2/modules"
for m in "${ROOT_MODULES[@]}"; do
    path="$(grep -E "(^|/)$m\.ko:" "$DEB/$MODDIR/modules.dep" | head -1)"
    [ -n "$path" ] || { echo "qemu-build: module $m is not in $KVER" >&2; exit 1; }
    for f in ${path/:/}; do
        install -D -m 0644 "$DEB/$MODDIR/$f" "$I2/$MODDIR/$f"
    done
done
install -m 0755 "$HERE/tier2-initrd.sh" "$I2/init"
cpio_of "$I2" "$OUT/tier2-initrd.cpio"
rm -rf "$I2"
echo "$KVER" > "$OUT/kernel-version"
log "done: $(du -sh "$OUT/tier1.cpio" | cut -f1) tier 1 initramfs, $(du -sh --apparent-size "$OUT/tier2.img" | cut -f1) tier 2 disk, kernel $KVER"
