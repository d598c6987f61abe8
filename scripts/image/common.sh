# Shared by scripts/build-image.sh (the lab image) and scripts/image/build-production.sh: sourced,
# with $cache set (the package cache, outside the repository).

# need installs the Debian packages of its arguments that are missing.
need() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    echo "installing: ${missing[*]}" >&2
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
}

# fetch_kernel META downloads (once, into $cache/debs) the kernel package the metapackage META
# depends on and unpacks it (once) into $cache/kernel-<package>; it sets kpkg, kroot and kver.
fetch_kernel() {
  local meta=$1 debs="$cache/debs" metadeb kdeb
  mkdir -p "$debs"
  (cd "$debs" && ls ${meta}_*.deb >/dev/null 2>&1 || apt-get download "$meta" 2>&1 | grep -v unsandboxed || true)
  metadeb=$(ls "$debs"/${meta}_*.deb | sort | tail -1)
  kpkg=$(dpkg-deb -f "$metadeb" Depends | sed -E 's/^([^ ,]+).*/\1/')
  (cd "$debs" && ls ${kpkg}_*.deb >/dev/null 2>&1 || apt-get download "$kpkg" 2>&1 | grep -v unsandboxed || true)
  kdeb=$(ls "$debs"/${kpkg}_*.deb | sort | tail -1)
  kroot="$cache/kernel-$kpkg"
  if [ ! -d "$kroot" ]; then
    rm -rf "$kroot.tmp" && mkdir -p "$kroot.tmp" && dpkg-deb -x "$kdeb" "$kroot.tmp" && mv "$kroot.tmp" "$kroot"
  fi
  kver=$(ls "$kroot/lib/modules" | head -1)
}
