#!/bin/busybox sh
# Tier 2's initramfs: loads the modules the root disk needs (virtio and ext4 are modules in
# Debian's kernel), mounts /dev/vda and hands over to systemd, as a phone's initramfs would.
/bin/busybox --install -s
export PATH=/usr/bin:/bin:/usr/sbin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules); do
    modprobe "$m" || echo "@@hearth fatal modprobe $m failed"
done
for _ in $(seq 1 100); do
    [ -b /dev/vda ] && break
    sleep 0.1
done
mount -t ext4 -o rw /dev/vda /newroot || { echo "@@hearth fatal cannot mount /dev/vda"; poweroff -f; }
umount /proc /sys
mount --move /dev /newroot/dev
exec /bin/busybox switch_root /newroot /lib/systemd/systemd
