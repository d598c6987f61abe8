#!/usr/bin/env bash
# Builds herd's production hypervisor image: Debian's generic kernel, and an initramfs holding a
# Debian bookworm root (mmdebstrap, minbase) with libvirt, QEMU and RBD support, cut down, plus the
# herd agent and scripts/image/init. Nothing downloaded is committed: the Debian packages are cached
# in HERD_CACHE (default ~/.cache/herd), outside the repository.
#
# Usage: scripts/build-image.sh [OUT_DIR] [VERSION]     (scripts/build-image.sh --lab: the lab image)
# Env:   HERD_CACHE, HERD_IMAGE_MODULES (NIC drivers beyond the default list), HERD_MIRROR,
#        HERD_IMAGE_OVERLAY (a directory copied over the root: site configuration, firmware, the
#        direct-kernel-boot files of /var/lib/herd/boot)
# Output: OUT_DIR/vmlinuz, OUT_DIR/initrd.img (zstd), OUT_DIR/manifest.json
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-build/image}
version=${2:-$(git describe --always --dirty 2>/dev/null || echo dev)}
cache=${HERD_CACHE:-$HOME/.cache/herd}
mirror=${HERD_MIRROR:-http://deb.debian.org/debian}
export PATH="$PATH:/usr/local/go/bin"
start=$(date +%s)

source scripts/image/common.sh
need mmdebstrap cpio zstd kmod libvirt-dev pkg-config binutils librados-dev librbd-dev

# What the hypervisor runs. ceph-common (the ceph and rbd command-line tools, and Python with them)
# is left out: QEMU reaches RBD through librbd (qemu-block-extra), the agent through go-ceph.
packages=libvirt-daemon,libvirt-daemon-driver-qemu,qemu-system-x86,qemu-block-extra,qemu-utils,busybox,iproute2,kmod,nftables,procps

# Kernel: the generic flavour, for real NICs and KVM; only the modules below (and what they
# depend on) are copied.
fetch_kernel linux-image-amd64
mkdir -p "$cache/apt"

mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
[ -n "${HERD_KEEP_ROOT:-}" ] && trap 'echo "root kept in $work/root"' EXIT
root="$work/root"

# The root: Debian packages, cached between builds (mmdebstrap's sync-in/sync-out hooks).
mmdebstrap --quiet --variant=minbase --include="$packages" \
  --aptopt='APT::Install-Recommends "false"' --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --skip=download/empty --skip=essential/unlink \
  --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
  --setup-hook="sync-in $cache/apt /var/cache/apt/archives/" \
  --customize-hook="sync-out /var/cache/apt/archives $cache/apt" \
  bookworm "$root" "$mirror"

# What the image holds, for the manifest: every package and its version.
pkgs=$(dpkg-query --admindir="$root/var/lib/dpkg" -W -f='${Package}=${Version}\n' | sort)

# Cut down: package caches, firmware for CPUs a herd node never emulates, docs that slipped by.
rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/usr/share/{doc,man,info,lintian,bash-completion}
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'C.*' -exec rm -rf {} + 2>/dev/null || true
(cd "$root/usr/share/qemu" && rm -rf openbios-* palcode-* s390-* slof.bin skiboot.lid u-boot* opensbi-* hppa-* \
  qemu_vga.ndrv QEMU,* canyonlands.dtb bamboo.dtb petalogix-* npcm7xx* edk2-aarch64* edk2-arm* edk2-riscv* \
  edk2-loongarch64* 2>/dev/null || true)
rm -f "$root"/usr/bin/qemu-system-i386

# The agent, with cgo for libvirt; built against this machine's bookworm libraries, which the root
# carries in the same versions.
go build -trimpath -tags agentonly -ldflags "-s -w -X github.com/herdhq/herd/lib/version.Version=$version" -o "$root/usr/local/bin/herd" ./cmd/herd
missing=$(chroot "$root" ldd /usr/local/bin/herd | grep 'not found' || true)
if [ -n "$missing" ]; then
  echo "the agent needs libraries the image lacks:" >&2
  echo "$missing" >&2
  exit 1
fi

# Kernel modules: the hypervisor's, and NIC drivers for common server hardware (extend with
# HERD_IMAGE_MODULES); dependencies are resolved by depmod, loaded by modprobe in /init.
modules="kvm kvm_intel kvm_amd vhost_net tun bridge br_netfilter veth rbd libceph overlay
  virtio_net virtio_pci virtio_blk virtio_scsi e1000 e1000e igb ixgbe i40e ice mlx5_core bnxt_en tg3 r8169
  ${HERD_IMAGE_MODULES:-}"
mdir="$kroot/lib/modules/$kver"
mkdir -p "$root/lib/modules/$kver"
cp "$mdir"/modules.order "$mdir"/modules.builtin* "$root/lib/modules/$kver/"
declare -A seen=()
add_module() {
  local m=${1//-/_} f dep
  [ -n "${seen[$m]:-}" ] && return 0
  seen[$m]=1
  f=$(find "$mdir" -name "$m.ko" -o -name "${m//_/-}.ko" | head -1)
  if [ -z "$f" ]; then
    grep -qE "/(${m}|${m//_/-}).ko\$" "$mdir/modules.builtin" && return 0
    echo "module $m not found in $kpkg" >&2
    exit 1
  fi
  for dep in $(modinfo -F depends "$f" | tr , ' '); do add_module "$dep"; done
  mkdir -p "$root/lib/modules/$kver/$(dirname "${f#$mdir/}")"
  cp "$f" "$root/lib/modules/$kver/${f#$mdir/}"
}
for m in $modules; do add_module "$m"; done
depmod -b "$root" "$kver"
echo "virtio_net virtio_pci tun vhost_net bridge rbd" | tr ' ' '\n' >"$root/etc/herd-modules.tmp"
mkdir -p "$root/etc/herd"
mv "$root/etc/herd-modules.tmp" "$root/etc/herd/modules"

# Configuration: QEMU as root without an LSM (the image has none); no mount namespaces (the root
# file system is the initramfs, where libvirt cannot set them up); consoles to files.
# libvirtd resolves the QEMU driver's built-in default user even when qemu.conf names root.
chroot "$root" sh -c 'getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu; getent passwd libvirt-qemu >/dev/null || useradd -r -g libvirt-qemu -s /usr/sbin/nologin -d /var/lib/libvirt libvirt-qemu'
mkdir -p "$root/etc/libvirt"
cat >"$root/etc/libvirt/qemu.conf" <<'CONF'
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
namespaces = []
stdio_handler = "file"
CONF
if [ -n "${HERD_IMAGE_OVERLAY:-}" ]; then
  cp -a "$HERD_IMAGE_OVERLAY/." "$root/"
fi
cp scripts/image/init "$root/init"
cp scripts/image/udhcpc.script "$root/etc/herd/udhcpc.script"
echo "$version" >"$root/etc/herd/image-version"
echo "127.0.0.1 localhost" >"$root/etc/hosts"
mkdir -p "$root/etc/ceph"

# The root lives in memory; with the unpacking copy, a node needs about twice its size and room to
# run VMs: refuse to start below that, in words (/init).
size_kib=$(du -sk "$root" | cut -f1)
echo $((size_kib * 2 + 512 * 1024)) >"$root/etc/herd/min-memory-kib"

# What /init needs before its memory check goes first in the archive (with its directories and what
# its symlinks point to): the kernel unpacks in order, and on a machine too small for all of the
# image, the tmpfs fills up, unpacking stops, and the kernel runs /init with what is there. Paths are
# real ones (usr/lib64, not lib64): an entry through a symlink unpacks only once its target exists.
early="init usr/bin/sh usr/bin/dash usr/bin/busybox usr/lib64/ld-linux-x86-64.so.2 usr/lib/x86_64-linux-gnu/libc.so.6
  usr/lib/x86_64-linux-gnu/libresolv.so.2 bin sbin lib lib64 etc proc sys dev run"
(
  cd "$root"
  {
    for p in $early; do # each with its directories, and what it links to
      for q in "$p" "$(chroot . readlink -f "/$p" | sed 's|^/||')"; do
        [ -n "$q" ] && { [ -e "$q" ] || [ -L "$q" ]; } || continue
        d=$q
        while [ "$d" != . ]; do echo "./$d"; d=$(dirname "$d"); done
      done
    done
    find ./etc/herd "./usr/lib/modules"
  } | LC_ALL=C sort -u >"$work/early"
  find . | LC_ALL=C sort | LC_ALL=C comm -23 - "$work/early" >"$work/rest"
  cat "$work/early" "$work/rest" | cpio -o -H newc --quiet --reproducible
) | zstd -q -T0 -12 >"$out/initrd.img"
cp "$kroot/boot/vmlinuz-$kver" "$out/vmlinuz"
ksum=$(sha256sum "$out/vmlinuz" | cut -d' ' -f1)
isum=$(sha256sum "$out/initrd.img" | cut -d' ' -f1)
pkgjson=$(echo "$pkgs" | awk -F= 'BEGIN{printf "{"} NR>1{printf ","} {printf "\"%s\":\"%s\"", $1, $2} END{printf "}"}')
cat >"$out/manifest.json" <<JSON
{"version":"$version","kind":"production",
 "kernel":{"file":"vmlinuz","package":"$kpkg","release":"$kver","sha256":"$ksum","size":$(stat -c %s "$out/vmlinuz")},
 "initrd":{"file":"initrd.img","sha256":"$isum","size":$(stat -c %s "$out/initrd.img"),"unpacked_kib":$size_kib},
 "min_memory_mib":$(( (size_kib * 2 + 512 * 1024) / 1024 )),
 "modules":"$(echo $modules)",
 "packages":$pkgjson,
 "built":"$(date -u +%Y-%m-%dT%H:%M:%SZ)","build_seconds":$(( $(date +%s) - start ))}
JSON
echo "image $version in $out: kernel $kver, initrd $(du -h "$out/initrd.img" | cut -f1) ($((size_kib / 1024)) MiB unpacked), $(echo "$pkgs" | wc -l) packages, $(( $(date +%s) - start ))s"
echo "add it: herdctl image add $version --kernel $out/vmlinuz --initrd $out/initrd.img --copy-to /var/lib/herd/images"
