#!/usr/bin/env bash
# Offline checks of the deployment artefacts: Helm chart (lint, schema, strict decoding of
# every rendered object into the official Kubernetes/Istio types, mesh properties, the Grafana
# dashboard and the alerts with promtool check rules / test rules), istio/,
# Dockerfile and its runtime package list. No cluster, no container engine.
# Prints "deploy: N passed, M failed" and exits non-zero on any failure.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
CACHE=${MESHGATE_CACHE:-$HOME/.cache/meshgate}
pass=0
fail=0
ok()  { pass=$((pass + 1)); echo "ok   $*"; }
bad() { fail=$((fail + 1)); echo "FAIL $*"; }
summary() { echo "deploy: $pass passed, $fail failed"; [ "$fail" = 0 ]; exit $?; }

# --- helm ------------------------------------------------------------------------------------
if [ -x "$root/tests/infra/helm.sh" ]; then
  HELM=$("$root/tests/infra/helm.sh") || { bad "helm: tests/infra/helm.sh failed"; summary; }
else
  HELM=$CACHE/bin/helm
  if ! [ -x "$HELM" ]; then
    mkdir -p "$CACHE/bin"
    GOBIN=$CACHE/bin go install helm.sh/helm/v3/cmd/helm@v3.16.4 || { bad "helm: go install failed"; summary; }
  fi
fi
export HELM
ok "helm: $HELM"

# promtool (Debian package prometheus) checks the chart's alert rules in the go test below.
command -v promtool >/dev/null && ok "promtool: $(command -v promtool)" || bad "promtool: not installed (tests/infra/install-deps.sh)"

# --- chart: go test (lint, render, strict types, mesh checks, negative cases) ------------------
log=$(mktemp)
trap 'rm -f "$log"; [ -n "${tmpd:-}" ] && rm -rf "$tmpd"' EXIT
(cd "$here" && go test -count=1 -v ./...) >"$log" 2>&1
rc=$?
gp=$(grep -cE '^[[:space:]]*--- PASS' "$log")
gf=$(grep -cE '^[[:space:]]*--- FAIL' "$log")
pass=$((pass + gp))
fail=$((fail + gf))
if [ "$rc" != 0 ]; then
  grep -E -B2 -A12 '^[[:space:]]*--- FAIL|^(FAIL|panic|#)|cannot|undefined' "$log" | head -n 120
  [ "$gf" = 0 ] && bad "go test exited $rc"
fi
echo "go test: $gp passed, $gf failed"

# --- Dockerfile --------------------------------------------------------------------------------
df=$root/Dockerfile
n=$(grep -cE '^[[:space:]]*ARG[[:space:]]+RUNTIME_PACKAGES=' "$df")
[ "$n" = 1 ] && ok "Dockerfile: one ARG RUNTIME_PACKAGES" || bad "Dockerfile: $n ARG RUNTIME_PACKAGES lines, want 1"
grep -qE '^FROM debian:bookworm AS build' "$df" && grep -qE '^FROM debian:bookworm-slim' "$df" &&
  ok "Dockerfile: multi-stage bookworm" || bad "Dockerfile: want FROM debian:bookworm AS build + debian:bookworm-slim runtime"
user=$(grep -E '^USER ' "$df" | tail -n1 | awk '{print $2}')
case "${user%%:*}" in ''|0|root) bad "Dockerfile: last USER is '${user:-none}', want non-root" ;; *) ok "Dockerfile: runs as $user" ;; esac
missing=""
for p in build-essential cmake pkg-config libgrpc-dev protobuf-c-compiler libprotobuf-c-dev libhiredis-dev \
         librdkafka-dev libnats-dev libwebsockets-dev libcurl4-openssl-dev libjansson-dev libjwt-dev libssl-dev; do
  grep -qE "(^|[[:space:]])$p([[:space:]]|\\\\|$)" "$df" || missing="$missing $p"
done
[ -z "$missing" ] && ok "Dockerfile: build packages" || bad "Dockerfile: build packages missing:$missing"
grep -q 'cmake -S . -B build -DCMAKE_BUILD_TYPE=Release' "$df" && ok "Dockerfile: cmake build" || bad "Dockerfile: no cmake -S . -B build -DCMAKE_BUILD_TYPE=Release"

# --- check-runtime-libs.sh: proven on a binary that exists (/usr/bin/curl) --------------------
chk=$here/check-runtime-libs.sh
tmpd=$(mktemp -d)
if [ -x /usr/bin/curl ] && command -v dpkg >/dev/null && command -v readelf >/dev/null; then
  curlpkg=$(dpkg -S "$(readlink -f "$(ldd /usr/bin/curl | awk '$1 ~ /^libcurl/ {print $3; exit}')")" 2>/dev/null | cut -d: -f1)
  printf 'FROM x\nARG RUNTIME_PACKAGES="%s"\n' "$curlpkg" >"$tmpd/right"
  printf 'FROM x\nARG RUNTIME_PACKAGES=""\n' >"$tmpd/missing"
  printf 'FROM x\nARG RUNTIME_PACKAGES="%s libjansson4"\n' "$curlpkg" >"$tmpd/extra"
  "$chk" --dockerfile "$tmpd/right" /usr/bin/curl >/dev/null 2>&1 && ok "runtime-libs: curl with the right list passes" || bad "runtime-libs: curl with [$curlpkg] rejected"
  "$chk" --dockerfile "$tmpd/missing" /usr/bin/curl >/dev/null 2>&1 && bad "runtime-libs: missing $curlpkg not caught" || ok "runtime-libs: missing package caught"
  "$chk" --dockerfile "$tmpd/extra" /usr/bin/curl >/dev/null 2>&1 && bad "runtime-libs: unneeded libjansson4 not caught" || ok "runtime-libs: unneeded package caught"
else
  bad "runtime-libs: need /usr/bin/curl, dpkg and readelf to test the checker"
fi
# The real binaries, when built (cmake --build build).
bins=()
for b in "$root/build/meshgate" "$root/build/meshgate-cli"; do [ -x "$b" ] && bins+=("$b"); done
if [ ${#bins[@]} -gt 0 ]; then
  if out=$("$chk" --dockerfile "$df" "${bins[@]}" 2>&1); then ok "runtime-libs: Dockerfile list matches ${bins[*]#$root/}"
  else echo "$out"; bad "runtime-libs: Dockerfile RUNTIME_PACKAGES does not match the built binaries"; fi
else
  echo "skip runtime-libs on build/meshgate: not built"
fi

summary
