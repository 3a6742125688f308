#!/usr/bin/env bash
# Check the Dockerfile's runtime package list against what binaries really link.
#
# Usage: check-runtime-libs.sh [--dockerfile PATH] BINARY...
#
# For each binary: ldd resolves its libraries (any "not found" fails), the directly needed ones
# (ELF DT_NEEDED; apt pulls in their own dependencies) are mapped to Debian packages with
# `dpkg -S`. Fails if a needed package is neither in ARG RUNTIME_PACKAGES="..." of the Dockerfile
# nor already in debian:bookworm-slim, or if a listed package is needed by no binary.
# Run it on the build machine/stage, where the binaries were linked (Debian bookworm).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
dockerfile=$here/../../Dockerfile
if [ "${1:-}" = "--dockerfile" ]; then dockerfile=$2; shift 2; fi
[ $# -ge 1 ] || { echo "usage: $0 [--dockerfile PATH] BINARY..." >&2; exit 2; }

# Packages of debian:bookworm-slim (Priority: required and apt's dependencies) that
# the runtime stage need not list.
base="libc6 libgcc-s1 libstdc++6 zlib1g libzstd1 liblzma5 libbz2-1.0 libcrypt1 libselinux1
libpcre2-8-0 libsystemd0 libudev1 libacl1 libattr1 libaudit1 libcap-ng0 libcap2 libdb5.3
libgmp10 libgnutls30 libhogweed6 libnettle8 libp11-kit0 libtasn1-6 libunistring2 libidn2-0
libffi8 libxxhash0 liblz4-1 libgcrypt20 libgpg-error0 libseccomp2 libsemanage2 libsepol2
libtinfo6 libmd0 libpam0g libsmartcols1 libblkid1 libmount1 libuuid1 libdebconfclient0"

for tool in ldd readelf dpkg; do
  command -v "$tool" >/dev/null || { echo "check-runtime-libs: $tool not found" >&2; exit 2; }
done
[ -r "$dockerfile" ] || { echo "check-runtime-libs: cannot read $dockerfile" >&2; exit 2; }

line=$(grep -E '^[[:space:]]*ARG[[:space:]]+RUNTIME_PACKAGES=' "$dockerfile" || true)
[ "$(printf '%s' "$line" | grep -c .)" = 1 ] ||
  { echo "check-runtime-libs: need exactly one 'ARG RUNTIME_PACKAGES=\"...\"' line in $dockerfile" >&2; exit 2; }
listed=$(printf '%s\n' "$line" | sed -E 's/^[^=]*=//; s/^"//; s/"[[:space:]]*$//' | tr ' ' '\n' | sed '/^$/d' | sort -u)

# path -> package; dpkg may record /lib/... or /usr/lib/... (usrmerge), try both.
pkg_of() {
  local p=$1 real out cand
  real=$(readlink -f "$p")
  for cand in "$p" "$real" "/usr$real" "${real#/usr}"; do
    if out=$(dpkg -S "$cand" 2>/dev/null); then
      printf '%s\n' "$out" | head -n1 | cut -d: -f1
      return 0
    fi
  done
  return 1
}

needed=""
fail=0
for bin in "$@"; do
  [ -f "$bin" ] || { echo "check-runtime-libs: no such binary: $bin" >&2; exit 2; }
  ldd_out=$(ldd "$bin" 2>&1) || { echo "check-runtime-libs: ldd $bin failed: $ldd_out" >&2; exit 2; }
  if printf '%s\n' "$ldd_out" | grep -q 'not found'; then
    echo "FAIL $bin: unresolved libraries:" >&2
    printf '%s\n' "$ldd_out" | grep 'not found' >&2
    fail=1
  fi
  for lib in $(readelf -d "$bin" | sed -nE 's/.*\(NEEDED\).*\[(.*)\]/\1/p'); do
    path=$(printf '%s\n' "$ldd_out" | awk -v l="$lib" '$1 == l && $2 == "=>" { print $3; exit }')
    [ -n "$path" ] && [ "$path" != "not" ] || continue
    if ! pkg=$(pkg_of "$path"); then
      echo "FAIL $bin: $lib ($path) belongs to no Debian package" >&2
      fail=1
      continue
    fi
    echo "  $(basename "$bin"): $lib -> $pkg"
    needed="$needed $pkg"
  done
done
needed=$(printf '%s\n' $needed | sed '/^$/d' | sort -u)

for pkg in $needed; do
  if ! printf '%s\n' "$listed" | grep -qxF "$pkg" && ! printf '%s\n' $base | grep -qxF "$pkg"; then
    echo "FAIL package $pkg is needed but missing from RUNTIME_PACKAGES in $dockerfile" >&2
    fail=1
  fi
done
for pkg in $listed; do
  if ! printf '%s\n' "$needed" | grep -qxF "$pkg"; then
    echo "FAIL package $pkg is in RUNTIME_PACKAGES but no binary links it" >&2
    fail=1
  fi
done

if [ "$fail" = 0 ]; then
  echo "check-runtime-libs: ok ($(printf '%s\n' "$listed" | grep -c .) packages listed, all needed and present)"
fi
exit "$fail"
