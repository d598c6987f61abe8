#!/usr/bin/env bash
# Builds herd's netboot hypervisor image. Without --lab: the production image
# (scripts/image/build-production.sh: a Debian root with libvirt and QEMU). With --lab: the small
# lab image, a Debian cloud kernel and an initramfs holding busybox, the herd agent with the shared
# libraries it links, the NIC modules, and an /init that runs the agent against libvirt's test
# driver (herd.libvirt=test:///etc/herd/node.xml): fast to build and boot, for tests. Nothing
# downloaded is committed: Debian packages are fetched into a cache outside the repository.
#
# Usage: scripts/build-image.sh [--lab] [OUT_DIR] [VERSION]
#   OUT_DIR  default build/image          VERSION  default: git describe
# Env:     HERD_CACHE (default ~/.cache/herd)
# Output:  OUT_DIR/vmlinuz, OUT_DIR/initrd.gz, OUT_DIR/manifest.json
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" != "--lab" ]; then
  exec scripts/image/build-production.sh "$@"
fi
shift
out=${1:-build/image}
version=${2:-$(git describe --always --dirty 2>/dev/null || echo dev)}
cache=${HERD_CACHE:-$HOME/.cache/herd}
export PATH="$PATH:/usr/local/go/bin"

source scripts/image/common.sh
need busybox-static cpio gzip libvirt-dev pkg-config binutils librados-dev librbd-dev

# Kernel: the cloud flavour is small and has the virtio drivers as modules.
fetch_kernel linux-image-cloud-amd64

# The agent, with cgo for libvirt.
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# agentonly leaves out the embedded etcd server (herd dev, herd etcd): half the size.
go build -trimpath -tags agentonly -ldflags "-s -w -X github.com/herdhq/herd/lib/version.Version=$version" -o "$work/herd" ./cmd/herd

root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,usr/local/bin,etc/herd,proc,sys,dev,run,tmp,var/lib/herd,var/log,lib/modules/"$kver",root}
cp /bin/busybox "$root/bin/busybox"
for app in $("$root/bin/busybox" --list); do
  [ -e "$root/bin/$app" ] || ln -s busybox "$root/bin/$app"
done
cp "$work/herd" "$root/usr/local/bin/herd"

# Shared libraries, as ldd lists them (libvirt pulls in a few dozen), and the dynamic loader.
ldd "$work/herd" | awk '/=>/ {print $3} /^\s*\/lib/ {print $1}' | sort -u | while read -r lib; do
  [ -f "$lib" ] || continue
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
# Debian links /lib64/ld-linux-x86-64.so.2; make sure both spellings exist.
if [ -f /lib64/ld-linux-x86-64.so.2 ]; then
  mkdir -p "$root/lib64" && cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"
fi
# libvirt reads its CPU map and capabilities data at runtime.
for d in /usr/share/libvirt; do
  [ -d "$d" ] && mkdir -p "$root$d" && cp -a "$d/." "$root$d/"
done

# NIC drivers: virtio for VMs and labs; extend HERD_IMAGE_MODULES for real hardware (docs/image.md).
# Dependencies come from each module's own depends= field, loaded first.
modules=${HERD_IMAGE_MODULES:-virtio_net virtio_pci}
: >"$root/etc/herd/modules"
declare -A added=()
add_module() {
  local m=$1 f dep
  [ -n "${added[$m]:-}" ] && return 0
  f=$(find "$kroot/lib/modules/$kver" -name "$m.ko" | head -1)
  if [ -z "$f" ]; then
    if grep -q "/$m.ko\$" "$kroot/lib/modules/$kver/modules.builtin"; then
      added[$m]=builtin
      return 0
    fi
    echo "module $m not found in $kpkg" >&2
    exit 1
  fi
  added[$m]=1
  for dep in $(strings "$f" | sed -n 's/^depends=//p' | tr , ' '); do
    add_module "$dep"
  done
  cp "$f" "$root/lib/modules/$kver/"
  echo "$m.ko" >>"$root/etc/herd/modules"
}
for m in $modules; do add_module "$m"; done

cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
EOF
cat >"$root/etc/group" <<'EOF'
root:x:0:
EOF
echo "127.0.0.1 localhost" >"$root/etc/hosts"
echo "$version" >"$root/etc/herd/image-version"

cat >"$root/etc/herd/udhcpc.script" <<'EOF'
#!/bin/sh
# busybox udhcpc hook: configure the interface from the lease.
case "$1" in
  deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    : >/etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
    ;;
esac
exit 0
EOF
chmod +x "$root/etc/herd/udhcpc.script"

cat >"$root/init" <<'EOF'
#!/bin/sh
# herd netboot init: everything this node is comes from the kernel command line the bootserver
# wrote (herd.hwid, herd.endpoints, herd.image, herd.syslog, herd.libvirt, and with TLS herd.join,
# herd.ca and the one-time herd.token); nothing is stored, no secret is in the image.
export PATH=/usr/local/bin:/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
log() { echo "herd-init: $*" >/dev/console; }

HWID= BOOTMAC= ENDPOINTS= IMAGE=$(cat /etc/herd/image-version) SYSLOG= LIBVIRT=qemu:///system AGENTARGS= JOIN= CAHASH= TOKEN=
for p in $(cat /proc/cmdline); do
  case "$p" in
    herd.hwid=*) HWID=${p#herd.hwid=} ;;
    herd.mac=*) BOOTMAC=${p#herd.mac=} ;;
    herd.endpoints=*) ENDPOINTS=${p#herd.endpoints=} ;;
    herd.image=*) IMAGE=${p#herd.image=} ;;
    herd.syslog=*) SYSLOG=${p#herd.syslog=} ;;
    herd.libvirt=*) LIBVIRT=${p#herd.libvirt=} ;;
    herd.agent=*) AGENTARGS="$AGENTARGS $(echo "${p#herd.agent=}" | tr , ' ')" ;;
    herd.join=*) JOIN=${p#herd.join=} ;;
    herd.ca=*) CAHASH=${p#herd.ca=} ;;
    herd.token=*) TOKEN=${p#herd.token=} ;;
  esac
done
log "image $IMAGE, hwid ${HWID:-unknown}"

KVER=$(uname -r)
for m in $(cat /etc/herd/modules); do
  out=$(insmod "/lib/modules/$KVER/$m" 2>&1) || log "insmod $m: $out"
done

ip link set lo up
# The boot NIC: the one whose MAC is the hardware id, else the first Ethernet interface.
IFACE=
for d in /sys/class/net/*; do
  n=${d##*/}
  [ "$n" = lo ] && continue
  [ -z "$IFACE" ] && IFACE=$n
  [ "$(cat "$d/address")" = "$HWID" ] && IFACE=$n
  [ -n "$BOOTMAC" ] && [ "$(cat "$d/address")" = "$BOOTMAC" ] && IFACE=$n
done
if [ -z "$IFACE" ]; then
  log "no network interface: is the NIC's driver in /etc/herd/modules? dropping to a shell"
  exec sh
fi
until udhcpc -i "$IFACE" -s /etc/herd/udhcpc.script -q -t 5 -T 2 -n >/dev/null 2>&1; do
  log "no DHCP lease on $IFACE yet; retrying"
  sleep 2
done
log "network up on $IFACE: $(ip -4 -o addr show dev "$IFACE" | awk '{print $4}')"
hostname "hv-$(echo "$HWID" | tr -d ':')"

# The libvirt test driver (herd.libvirt=test:///etc/herd/node.xml) models this machine's own size.
CPUS=$(grep -c ^processor /proc/cpuinfo)
MEMKB=$(awk '/MemTotal/ {print $2}' /proc/meminfo)
cat >/etc/herd/node.xml <<XML
<node><cpu><mhz>2000</mhz><model>herd</model><active>$CPUS</active><total>$CPUS</total><nodes>1</nodes><sockets>1</sockets><cores>$CPUS</cores><threads>1</threads></cpu><memory>$MEMKB</memory></node>
XML

set -- agent --endpoints "$ENDPOINTS" --image "$IMAGE" --libvirt-uri "$LIBVIRT" --volume-dir /var/lib/herd/volumes --listen :9480 \
  --reboot-command 'reboot -f' 
[ -n "$HWID" ] && set -- "$@" --hwid "$HWID"
[ -n "$SYSLOG" ] && set -- "$@" --syslog "$SYSLOG"
# The token goes by environment, not argv, so it is not in every `ps`; it is spent at the first
# join, and restarts of the agent use the certificate in /run/herd/credentials.
[ -n "$JOIN" ] && set -- "$@" --join "$JOIN" --ca-hash "$CAHASH" --cred-dir /run/herd/credentials
[ -n "$JOIN" ] && [ -n "$BOOTMAC" ] && set -- "$@" --join-mac "$BOOTMAC"
export HERD_JOIN_TOKEN="$TOKEN"
while true; do
  log "starting agent"
  herd "$@" $AGENTARGS >/dev/console 2>&1
  log "agent exited ($?); restarting"
  sleep 2
done
EOF
chmod +x "$root/init"

(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -1 >"$out/initrd.gz"
cp "$kroot/boot/vmlinuz-$kver" "$out/vmlinuz"
ksum=$(sha256sum "$out/vmlinuz" | cut -d' ' -f1)
isum=$(sha256sum "$out/initrd.gz" | cut -d' ' -f1)
cat >"$out/manifest.json" <<EOF
{"version":"$version","kernel":{"file":"vmlinuz","package":"$kpkg","release":"$kver","sha256":"$ksum","size":$(stat -c %s "$out/vmlinuz")},
 "initrd":{"file":"initrd.gz","sha256":"$isum","size":$(stat -c %s "$out/initrd.gz")},"built":"$(date -u +%Y-%m-%dT%H:%M:%SZ)"}
EOF
echo "image $version in $out: kernel $kver, initrd $(du -h "$out/initrd.gz" | cut -f1)"
echo "add it: herdctl image add $version --kernel $out/vmlinuz --initrd $out/initrd.gz --copy-to /var/lib/herd/images"
