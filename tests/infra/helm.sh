#!/usr/bin/env bash
# Install Helm from its Go module into the cache (once) and print the binary's path.
# Usage: tests/infra/helm.sh            -> prints $MESHGATE_CACHE/bin/helm
#   MESHGATE_HELM_VERSION (default v3.16.4), MESHGATE_CACHE (default ~/.cache/meshgate)
set -euo pipefail

CACHE=${MESHGATE_CACHE:-$HOME/.cache/meshgate}
VER=${MESHGATE_HELM_VERSION:-v3.16.4}
BIN=$CACHE/bin/helm

die() { echo "helm: $*" >&2; exit 1; }

if ! { [ -x "$BIN" ] && "$BIN" version --short >/dev/null 2>&1; }; then
  GO=$(command -v go || echo /usr/local/go/bin/go)
  [ -x "$GO" ] || die "go not found"
  mkdir -p "$CACHE/bin"
  log=$CACHE/helm-build.log
  # Helm's version string is normally set by its Makefile; set it the same way.
  if ! GOBIN=$CACHE/bin GOFLAGS=-mod=mod timeout 1800 "$GO" install \
        -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$VER" \
        "helm.sh/helm/v3/cmd/helm@$VER" >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    die "go install helm.sh/helm/v3/cmd/helm@$VER failed (log: $log)"
  fi
  "$BIN" version --short >/dev/null 2>&1 || die "installed $BIN but 'helm version' fails"
fi
echo "$BIN"
