#!/usr/bin/env bash
# Prints the GOFLAGS herd builds with on this machine: go-ceph needs a build tag naming the Ceph
# release whose librados/librbd it links against when that release is older than go-ceph's default.
# Debian 12 ships Ceph 16 (pacific); Ubuntu 22.04 ships 17 (quincy).
set -u
release=""
if v=$(dpkg-query -W -f='${Version}' librados-dev 2>/dev/null) && [ -n "$v" ]; then
  case "${v%%.*}" in
    16) release=pacific ;;
    17) release=quincy ;;
  esac
elif [ -r /etc/os-release ]; then
  . /etc/os-release
  case "${VERSION_CODENAME:-}" in
    bookworm) release=pacific ;;
    jammy) release=quincy ;;
  esac
fi
[ -n "$release" ] && echo "-tags=$release"
exit 0
