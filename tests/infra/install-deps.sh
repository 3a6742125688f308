#!/usr/bin/env bash
# Install the Debian (bookworm) packages meshgate needs to build and to run its
# real test services. Idempotent: only runs `apt-get update` + install when a
# package is missing. Must run as root (or with sudo available).
# Usage: tests/infra/install-deps.sh
set -euo pipefail

PKGS=(build-essential cmake pkg-config libgrpc-dev protobuf-c-compiler libprotobuf-c-dev
      libhiredis-dev librdkafka-dev libnats-dev libwebsockets-dev libwebsockets-evlib-ev libev-dev
      libcurl4-openssl-dev libcriterion-dev
      libjansson-dev libjwt-dev libssl-dev libjemalloc-dev redis-server redis-tools clang-format clang
      libclang-rt-dev
      python3-grpcio python3-protobuf python3-grpc-tools protobuf-compiler maven valgrind
      curl ca-certificates prometheus)
command -v java >/dev/null 2>&1 || PKGS+=(openjdk-17-jre-headless)
# libclang-rt-dev: clang's libFuzzer and sanitizer runtimes (tests/fuzz, `make test`'s fuzz step);
# clang only recommends them, and a machine that installs without recommends lacks them.
# prometheus: only for promtool (tests/deploy checks the chart's alert rules with it); its
# server is never started (policy-rc.d below, and disabled after the install).
# The JavaScript client SDK (clients/js, scripts/run-sdk-tests.sh): Node >= 18 with npm, and
# Debian's chromium for its browser test (puppeteer-core drives it; nothing downloads a browser).
node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
if ! command -v npm >/dev/null 2>&1 || [ "$node_major" -lt 18 ]; then PKGS+=(nodejs npm); fi
PKGS+=(chromium fonts-dejavu-core)
# Note: bookworm's golang is 1.19, too old for Consul/Helm (need Go >= 1.25);
# it is only a fallback so that the message below is explicit.
command -v go >/dev/null 2>&1 || [ -x /usr/local/go/bin/go ] || PKGS+=(golang)

die() { echo "install-deps: $*" >&2; exit 1; }

missing=()
for p in "${PKGS[@]}"; do
  st=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
  [ "$st" = installed ] || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "need root to install: ${missing[*]}"
    SUDO="sudo"
  fi
  # Keep package postinst scripts from starting system services (redis-server on :6379).
  policy_created=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod 755 /usr/sbin/policy-rc.d
    policy_created=1
  fi
  trap '[ $policy_created -eq 1 ] && $SUDO rm -f /usr/sbin/policy-rc.d' EXIT
  log=$(mktemp)
  if ! { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q &&
         $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
    tail -n 30 "$log" >&2; rm -f "$log"
    die "apt-get install failed for: ${missing[*]}"
  fi
  rm -f "$log"
fi

# Our clusters use their own ports; a distro redis on :6379 is just noise. Stop it if running.
if pgrep -x redis-server >/dev/null 2>&1 && redis-cli -p 6379 ping >/dev/null 2>&1; then
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet redis-server 2>/dev/null; then
    systemctl disable --now redis-server >/dev/null 2>&1 || true
  elif [ -x /etc/init.d/redis-server ]; then
    /etc/init.d/redis-server stop >/dev/null 2>&1 || true
  fi
fi

# Debian's prometheus package enables its server for boot; the tests only want promtool.
if command -v systemctl >/dev/null 2>&1 && systemctl is-enabled --quiet prometheus 2>/dev/null; then
  systemctl disable --now prometheus >/dev/null 2>&1 || true
fi

# Go toolchain check (Consul v1.22 / Helm v3.16 / nats-server v2.15 need a recent Go).
GO=$(command -v go || echo /usr/local/go/bin/go)
if [ -x "$GO" ]; then
  gv=$("$GO" env GOVERSION 2>/dev/null | sed 's/^go//')
  case "$(printf '%s\n1.25\n' "${gv%%[!0-9.]*}" | sort -V | head -1)" in
    1.25) ;;
    *) echo "install-deps: warning: go $gv is older than 1.25; consul.sh/helm.sh/nats.sh builds will fail" >&2 ;;
  esac
fi
