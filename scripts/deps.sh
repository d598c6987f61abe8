#!/usr/bin/env bash
# Installs what herd's build and tests need, only when missing: safe to run again and again.
# Usage: scripts/deps.sh [bench]
set -euo pipefail

# base: build (cgo libvirt), etcdctl for the raw-JSON tests, the PXE rig (QEMU, Debian's iPXE
# binaries, busybox and cpio for the netboot image), the production image's build (mmdebstrap, zstd,
# kmod: e2e/pxe TestProductionImage), isoinfo (genisoimage) to read VM seed images back, and chromium
# for the console's browser test; qemu-img (qemu-utils) for the leader to import qcow2 VM images.
want=(gcc pkg-config libvirt-dev libvirt0 etcd-client iproute2 qemu-system-x86 ipxe busybox-static cpio binutils
  mmdebstrap zstd kmod
  libvirt-daemon libvirt-daemon-driver-qemu util-linux
  ceph-mon ceph-osd ceph-common librados-dev librbd-dev uuid-runtime qemu-block-extra nftables
  atftp tftp-hpa curl ovmf genisoimage qemu-utils
  chromium)
for group in "$@"; do
  case "$group" in
    bench) want+=(dnsmasq-base nginx-light) ;;
    *) echo "unknown group $group" >&2; exit 2 ;;
  esac
done

missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# libvirtd's QEMU driver resolves its default user even when qemu.conf says root; Debian's
# libvirt-daemon-system creates it, but that package wants systemd.
if ! getent passwd libvirt-qemu >/dev/null; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  getent group libvirt-qemu >/dev/null || $sudo groupadd -r libvirt-qemu
  $sudo useradd -r -g libvirt-qemu -s /usr/sbin/nologin -d /var/lib/libvirt libvirt-qemu
fi

if ! command -v go >/dev/null 2>&1; then
  echo "Go is missing: install it from https://go.dev/dl/ (herd needs the version go.mod names)" >&2
  exit 1
fi
go mod download
