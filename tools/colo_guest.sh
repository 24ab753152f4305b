#!/usr/bin/env bash
# Build the tiny guest of the real-COLO-pair tests: Debian's kernel + a busybox-static initramfs.
#
# Why this guest: it boots under TCG in seconds, and everything it does is visible from outside.
# /init brings up eth0 with the address given as colo_ip=ADDR/PREFIX on the kernel command line,
# then runs busybox httpd on port 80:
#   /same            fixed bytes (identical on primary and secondary: compared and released)
#   /data            1 MiB of deterministic bytes (a long transfer that must survive a failover)
#   /cgi-bin/diverge uptime and random bytes: differs between the VMs, forcing a checkpoint
#   /cgi-bin/disk    the last record the disk writer put on /dev/vda
# and a disk writer that appends a numbered record to /dev/vda every second.
#
# Usage: tools/colo_guest.sh   (prints the directory holding vmlinuz and initrd.img)
# Env:   COLO_GUEST_DIR (default /var/cache/colo-proxy/guest)
set -euo pipefail

OUT="${COLO_GUEST_DIR:-/var/cache/colo-proxy/guest}"
SELF_HASH="$(sha256sum "$0" | cut -d' ' -f1)"
MODULES=(virtio virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
         failover net_failover virtio_net virtio_blk)

log() { echo "colo_guest: $*" >&2; }

if [[ -f "$OUT/stamp" && "$(cat "$OUT/stamp")" == "$SELF_HASH" && -f "$OUT/vmlinuz" \
      && -f "$OUT/initrd.img" ]]; then
    log "reusing $OUT"
    echo "$OUT"
    exit 0
fi

# busybox-static's binary (no shared libraries: it runs as the initramfs's only program)
BUSYBOX=/bin/busybox
if ! dpkg -s busybox-static >/dev/null 2>&1; then
    [[ $EUID -eq 0 ]] || { log "need busybox-static (apt-get install busybox-static)"; exit 1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >&2
fi
if ldd "$BUSYBOX" >/dev/null 2>&1; then log "$BUSYBOX is not statically linked"; exit 1; fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$OUT"

# The kernel: whatever linux-image-amd64 depends on, from Debian's registry through apt.
KPKG="$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')"
[[ -n "$KPKG" ]] || { log "cannot resolve linux-image-amd64"; exit 1; }
log "kernel package $KPKG"
(cd "$TMP" && apt-get download "$KPKG" >&2)
dpkg-deb -x "$TMP"/"$KPKG"_*.deb "$TMP/k"
KVER="${KPKG#linux-image-}"
cp "$TMP/k/boot/vmlinuz-$KVER" "$TMP/vmlinuz"

R="$TMP/root"
mkdir -p "$R"/{bin,sbin,proc,sys,dev,tmp,lib/modules,www/cgi-bin,etc}
cp "$BUSYBOX" "$R/bin/busybox"
for m in "${MODULES[@]}"; do
    f="$(find "$TMP/k/lib/modules/$KVER" -name "$m.ko*" | head -1)"
    [[ -n "$f" ]] || { log "module $m not found in $KPKG"; exit 1; }
    case "$f" in
        *.xz) xz -dc "$f" >"$R/lib/modules/$m.ko" ;;
        *.zst) zstd -qdc "$f" >"$R/lib/modules/$m.ko" ;;
        *) cp "$f" "$R/lib/modules/$m.ko" ;;
    esac
done

cat >"$R/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# No modules.dep: three passes settle any load order (virtio needs virtio_ring on 6.1).
for pass in 1 2 3; do
    for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci \
             failover net_failover virtio_net virtio_blk; do
        grep -q "^$m " /proc/modules || insmod /lib/modules/$m.ko 2>/dev/null
    done
done
ip=""
for a in $(cat /proc/cmdline); do
    case "$a" in colo_ip=*) ip="${a#colo_ip=}" ;; esac
done
n=0  # virtio probing finishes after insmod returns
while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
ip link set lo up
ip link set eth0 up
[ -n "$ip" ] && ip addr add "$ip" dev eth0
echo "same-answer-0123456789" >/www/same
i=0
while [ $i -lt 16384 ]; do
    printf '%063d\n' $i
    i=$((i + 1))
done >/www/data
cat >/www/cgi-bin/diverge <<'CGI'
#!/bin/sh
echo "Content-Type: text/plain"
echo
cat /proc/uptime
head -c 16 /dev/urandom | hexdump -e '16/1 "%02x" "\n"'
CGI
cat >/www/cgi-bin/disk <<'CGI'
#!/bin/sh
echo "Content-Type: text/plain"
echo
dd if=/dev/vda bs=512 count=1 2>/dev/null | tr -d '\000'
CGI
chmod +x /www/cgi-bin/*
httpd -p 80 -h /www
# The disk writer: sector 0 holds the newest record, sector n+1 record n (numbered, fsynced).
(n=0
 while [ -b /dev/vda ]; do
     n=$((n + 1))
     printf 'record %08d\n' $n | dd of=/dev/vda bs=512 seek=$n conv=notrunc,sync,fsync 2>/dev/null
     printf 'record %08d\n' $n | dd of=/dev/vda bs=512 conv=notrunc,sync,fsync 2>/dev/null
     sleep 1
 done) &
echo "COLO-GUEST-READY $ip"
while true; do sleep 3600; done
EOF
chmod +x "$R/init"
(cd "$R" && find . | "$BUSYBOX" cpio -o -H newc 2>/dev/null | gzip -1 >"$TMP/initrd.img")
install -m 0644 "$TMP/vmlinuz" "$OUT/vmlinuz"
install -m 0644 "$TMP/initrd.img" "$OUT/initrd.img"
echo "$KPKG" >"$OUT/kernel-package"
echo "$SELF_HASH" >"$OUT/stamp"
log "built $OUT (kernel $KPKG)"
echo "$OUT"
