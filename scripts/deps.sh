#!/usr/bin/env bash
# Installs what herd's build and tests need, only when missing: safe to run again and again.
# Usage: scripts/deps.sh [bench]
set -euo pipefail

# base: build (cgo libvirt), etcdctl for the raw-JSON tests, and the PXE rig (QEMU, Debian's iPXE
# binaries, busybox and cpio for the netboot image).
want=(gcc pkg-config libvirt-dev libvirt0 etcd-client iproute2 qemu-system-x86 ipxe busybox-static cpio binutils)
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

if ! command -v go >/dev/null 2>&1; then
  echo "Go is missing: install it from https://go.dev/dl/ (herd needs the version go.mod names)" >&2
  exit 1
fi
go mod download
