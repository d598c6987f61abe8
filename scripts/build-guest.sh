#!/usr/bin/env bash
# Builds the tiny test guest the real-hypervisor tests boot under QEMU: Debian's cloud kernel and a
# busybox initramfs whose init prints "guest <id>: counter N" every 0.5 s on the serial console and
# powers off cleanly on the ACPI power button (so a test can tell a guest's own shutdown from a
# destroy), and answers each line typed on the console with "guest <id>: heard <line>". With
# herd.net it configures its NICs and hostname from its NoCloud seed (the cidata CD-ROM) as
# cloud-init would; herd.ping=IP pings IP every 0.5 s ("guest <id>: ping IP ok|fail N"), and
# herd.spoof=IP does the same from IP, an address not its own ("guest <id>: spoof ...").
# Cached: rebuilt only when this script changes.
# Usage: scripts/build-guest.sh OUT_DIR     -> OUT_DIR/vmlinuz, OUT_DIR/guest.gz
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: build-guest.sh OUT_DIR}
cache=${HERD_CACHE:-$HOME/.cache/herd}
stamp=$(sha256sum "$0" | cut -c1-16)
if [ -f "$out/guest.gz" ] && [ "$(cat "$out/stamp" 2>/dev/null)" = "$stamp" ]; then
  exit 0
fi
debs="$cache/debs"
mkdir -p "$debs" "$out"
meta=linux-image-cloud-amd64
(cd "$debs" && ls ${meta}_*.deb >/dev/null 2>&1 || apt-get download "$meta" 2>&1 | grep -v unsandboxed || true)
kpkg=$(dpkg-deb -f "$(ls "$debs"/${meta}_*.deb | sort | tail -1)" Depends | sed -E 's/^([^ ,]+).*/\1/')
(cd "$debs" && ls ${kpkg}_*.deb >/dev/null 2>&1 || apt-get download "$kpkg" 2>&1 | grep -v unsandboxed || true)
kroot="$cache/kernel-$kpkg"
if [ ! -d "$kroot" ]; then
  rm -rf "$kroot.tmp" && mkdir -p "$kroot.tmp" && dpkg-deb -x "$(ls "$debs"/${kpkg}_*.deb | sort | tail -1)" "$kroot.tmp" && mv "$kroot.tmp" "$kroot"
fi
kver=$(ls "$kroot/lib/modules" | head -1)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/root"
mkdir -p "$root"/{bin,proc,sys,dev,etc/acpi/PWRF,lib/modules}
cp /bin/busybox "$root/bin/busybox"
for a in $("$root/bin/busybox" --list); do [ -e "$root/bin/$a" ] || ln -s busybox "$root/bin/$a"; done
# Power button, virtio-blk for a disk, virtio-scsi and isofs for the seed CD-ROM, virtio-net (in
# dependency order: the init loads them in this order).
mods="button evdev virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk
  scsi_common scsi_mod virtio_scsi cdrom sr_mod isofs failover net_failover virtio_net"
for m in $mods; do cp "$(find "$kroot/lib/modules/$kver" -name "$m.ko" | head -1)" "$root/lib/modules/"; done
echo "$mods" >"$root/etc/modules"
# busybox acpid maps the power button to PWRF/00000080, run from its config directory.
echo "PWRF PWRF/00000080" >"$root/etc/acpid.conf"
cat >"$root/etc/acpi/PWRF/00000080" <<'S'
#!/bin/sh
echo "guest: ACPI power button: shutting down cleanly" >/dev/console
sync
poweroff -f
S
cat >"$root/init" <<'S'
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /etc/modules); do insmod /lib/modules/$m.ko 2>/dev/null; done
id=$(sed -n 's/.*herd.guest=\([^ ]*\).*/\1/p' /proc/cmdline)
# herd.writer: append records "herd-rec <writer> <n>" to a log on the disk every 0.5 s, O_DIRECT and
# fsynced, each after the last record on the disk (re-read before every write, so two writers would
# alternate): the split-brain test. The writer is this boot.
if grep -q herd.writer /proc/cmdline && [ -e /sys/block/vda ]; then
  i=0; while [ ! -b /dev/vda ] && [ $i -lt 20 ]; do sleep 0.1; i=$((i+1)); done
  w="$id-$(cut -c1-8 /proc/sys/kernel/random/boot_id)"
  echo "guest $id: writer $w"
  (s=8; n=0; while true; do
    while r=$(dd if=/dev/vda bs=512 skip=$s count=1 iflag=direct 2>/dev/null | tr -d '\000'); case "$r" in herd-rec*) true ;; *) false ;; esac; do
      s=$((s+1))
    done
    if echo "herd-rec $w $n" | dd of=/dev/vda bs=512 seek=$s count=1 conv=sync,notrunc,fsync oflag=direct 2>/dev/null; then
      echo "guest $id: rec $w $n at $s"
    else
      echo "guest $id: write error at $s"
    fi
    s=$((s+1)); n=$((n+1)); sleep 0.5
  done) &
elif [ -e /sys/block/vda ]; then
  i=0; while [ ! -b /dev/vda ] && [ $i -lt 20 ]; do sleep 0.1; i=$((i+1)); done
  m=$(dd if=/dev/vda bs=512 count=1 2>/dev/null | tr -d '\000' | head -c 120)
  case "$m" in
    herd-marker*) echo "guest $id: found marker: $m" ;;
    *) echo "herd-marker $id $(cat /proc/sys/kernel/random/boot_id)" | dd of=/dev/vda bs=512 count=1 conv=sync,fsync 2>/dev/null
       sync
       echo "guest $id: wrote marker" ;;
  esac
fi
if grep -q herd.net /proc/cmdline; then
  # The seed: meta-data and network-config are JSON, one member per line; per NIC the addresses
  # come before the match (keys sorted).
  i=0; while [ ! -b /dev/sr0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
  mkdir -p /seed /tmp
  if mount -t iso9660 -o ro /dev/sr0 /seed; then
    hn=$(sed -n 's/.*"local-hostname": "\([^"]*\)".*/\1/p' /seed/meta-data)
    [ -n "$hn" ] && hostname "$hn" && echo "guest $id: hostname $hn"
    awk '/"addresses"/ { getline; gsub(/[ ",]/, ""); addr = $0 }
         /"macaddress"/ { gsub(/[ ",]/, ""); sub(/macaddress:/, ""); print "nic", $0, addr }
         /"via"/ { gsub(/[ ",]/, ""); sub(/via:/, ""); print "gw", $0 }' /seed/network-config >/tmp/net
    ip link set lo up
    while read -r kind a b; do
      if [ "$kind" = nic ]; then
        for d in /sys/class/net/*; do
          if [ "$(cat "$d/address")" = "$a" ]; then
            ip addr add "$b" dev "${d##*/}" && ip link set "${d##*/}" up && echo "guest $id: net ${d##*/} $b"
          fi
        done
      elif [ "$kind" = gw ]; then
        ip route add default via "$a"
      fi
    done </tmp/net
  else
    echo "guest $id: no seed"
  fi
fi
p=$(sed -n 's/.*herd.ping=\([^ ]*\).*/\1/p' /proc/cmdline)
[ -n "$p" ] && (n=0; while true; do
  if ping -c 1 -W 1 "$p" >/dev/null 2>&1; then r=ok; else r=fail; fi
  echo "guest $id: ping $p $r $n"; n=$((n+1)); sleep 0.5
done) &
sp=$(sed -n 's/.*herd.spoof=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$sp" ] && [ -n "$p" ]; then
  ip addr add "$sp/32" dev eth0
  (n=0; while true; do
    if ping -c 1 -W 1 -I "$sp" "$p" >/dev/null 2>&1; then r=ok; else r=fail; fi
    echo "guest $id: spoof $p $r $n"; n=$((n+1)); sleep 0.5
  done) &
fi
acpid -f -d -c /etc/acpi -a /etc/acpid.conf >/dev/null 2>&1 &  # -d: log to stderr, there is no /var/log
# Every line typed on the serial console comes back as "guest <id>: heard <line>": the console test.
(while read -r line; do echo "guest $id: heard $line"; done) </dev/console &
echo "guest $id: booted"
i=0
while true; do echo "guest $id: counter $i"; i=$((i+1)); sleep 0.5; done
S
chmod +x "$root/init" "$root/etc/acpi/PWRF/00000080"
(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -1 >"$out/guest.gz.tmp"
cp "$kroot/boot/vmlinuz-$kver" "$out/vmlinuz.tmp"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
mv "$out/guest.gz.tmp" "$out/guest.gz"
echo "$stamp" >"$out/stamp"
