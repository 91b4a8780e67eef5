#!/usr/bin/env bash
# KEDA, the peer troughfill is measured against side by side (bench.peers and its e2e test):
# its operator and its metrics API server (keda-adapter) built from the
# github.com/kedacore/keda/v2 module through the Go module proxy with the machine's Go
# (scripts/k8s/keda/go.mod pins the version, go.sum the bytes), and its CRDs copied from the
# same module. Idempotent: cached under $TROUGHFILL_CACHE/keda/bin-<version>-<go.sum hash>, built
# only when missing; modules and the build cache stay in $TROUGHFILL_CACHE/go.
#
# Source it after scripts/setup_k8s.sh (it exports TROUGHFILL_KEDA_BIN), or run it on its own.
set -euo pipefail

if ! declare -F k8s_go >/dev/null; then
  # shellcheck source=scripts/setup_k8s.sh
  source "$(dirname "${BASH_SOURCE[0]}")/setup_k8s.sh"
fi

KEDA_VERSION=2.21.0
KEDA_SOURCES="$TROUGHFILL_REPO/scripts/k8s/keda"
KEDA_DIR="$TROUGHFILL_CACHE/keda"
keda_inputs="$(cat "$KEDA_SOURCES/go.mod" "$KEDA_SOURCES/go.sum" | sha256sum | cut -c1-12)"
TROUGHFILL_KEDA_BIN="$KEDA_DIR/bin-v$KEDA_VERSION-$keda_inputs"
export TROUGHFILL_KEDA_BIN

keda_log() { printf '[setup-keda] %s\n' "$*" >&2; }

keda_built() {
  [ -x "$TROUGHFILL_KEDA_BIN/keda" ] && [ -x "$TROUGHFILL_KEDA_BIN/keda-adapter" ] \
    && [ -f "$TROUGHFILL_KEDA_BIN/crds/keda.sh_scaledobjects.yaml" ] \
    && [ -f "$TROUGHFILL_KEDA_BIN/crds/eventing.keda.sh_cloudeventsources.yaml" ]
}

keda_build() {
  local out="$TROUGHFILL_KEDA_BIN.tmp" log="$KEDA_DIR/build.log" module
  mkdir -p "$KEDA_DIR"
  rm -rf "$out"
  mkdir -p "$out/crds"
  : >"$log"
  # What KEDA's Makefile writes into a release build (version.Version).
  local ldflags="-s -w -X github.com/kedacore/keda/v2/version.Version=$KEDA_VERSION"
  keda_log "building KEDA v$KEDA_VERSION: keda (operator) and keda-adapter (metrics API server); log: $log"
  (cd "$KEDA_SOURCES" && k8s_go build -trimpath -ldflags "$ldflags" -o "$out/keda" \
    github.com/kedacore/keda/v2/cmd/operator && k8s_go build -trimpath -ldflags "$ldflags" \
    -o "$out/keda-adapter" github.com/kedacore/keda/v2/cmd/adapter) >>"$log" 2>&1 \
    || { tail -n 40 "$log" >&2; keda_log "KEDA build failed"; return 1; }
  module="$(cd "$KEDA_SOURCES" && k8s_go list -m -f '{{.Dir}}' github.com/kedacore/keda/v2)"
  cp "$module"/config/crd/bases/*.yaml "$out/crds/"
  chmod u+w "$out/crds/"*.yaml
  rm -rf "$TROUGHFILL_KEDA_BIN"
  mv "$out" "$TROUGHFILL_KEDA_BIN"
}

if ! keda_built; then
  keda_build
fi
keda_log "KEDA binaries in $TROUGHFILL_KEDA_BIN"
