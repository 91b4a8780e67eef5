#!/usr/bin/env bash
# Argo CD for the GitOps tests: its multi-call binary (application controller, repo server and
# API server, chosen by the name it runs as) built from the github.com/argoproj/argo-cd/v3
# module through the Go module proxy with the machine's Go, kustomize (which its repo server
# runs) from sigs.k8s.io/kustomize/kustomize/v5, both pinned by scripts/argocd/go.mod and
# go.sum, Argo CD's CRDs copied from the same module, and git (Debian's). Idempotent: cached
# under $TROUGHFILL_CACHE/argocd/bin-<version>-<inputs hash>, built only when missing.
#
# Source it after scripts/setup_k8s.sh (it exports TROUGHFILL_ARGOCD_BIN), or run it on its own.
set -euo pipefail

if ! declare -F k8s_go >/dev/null; then
  # shellcheck source=scripts/setup_k8s.sh
  source "$(dirname "${BASH_SOURCE[0]}")/setup_k8s.sh"
fi

ARGOCD_VERSION=3.2.6
ARGOCD_SOURCES="$TROUGHFILL_REPO/scripts/argocd"
ARGOCD_DIR="$TROUGHFILL_CACHE/argocd"
argocd_inputs="$(cat "$ARGOCD_SOURCES/go.mod" "$ARGOCD_SOURCES/go.sum" | sha256sum | cut -c1-12)"
TROUGHFILL_ARGOCD_BIN="$ARGOCD_DIR/bin-v$ARGOCD_VERSION-$argocd_inputs"
export TROUGHFILL_ARGOCD_BIN

argocd_log() { printf '[setup-argocd] %s\n' "$*" >&2; }

apt_install git

argocd_built() {
  [ -x "$TROUGHFILL_ARGOCD_BIN/argocd" ] && [ -x "$TROUGHFILL_ARGOCD_BIN/kustomize" ] \
    && [ -f "$TROUGHFILL_ARGOCD_BIN/crds/application-crd.yaml" ]
}

argocd_build() {
  local out="$TROUGHFILL_ARGOCD_BIN.tmp" log="$ARGOCD_DIR/build.log" module name
  mkdir -p "$ARGOCD_DIR"
  rm -rf "$out"
  mkdir -p "$out/crds"
  : >"$log"
  # What Argo CD's Makefile writes into a release build (common.version).
  local ldflags="-s -w -X github.com/argoproj/argo-cd/v3/common.version=$ARGOCD_VERSION"
  ldflags+=" -X github.com/argoproj/argo-cd/v3/common.gitTreeState=clean"
  argocd_log "building Argo CD v$ARGOCD_VERSION and kustomize (about 15 minutes on 2 cores the first time; log: $log)"
  (cd "$ARGOCD_SOURCES" && k8s_go build -trimpath -ldflags "$ldflags" -o "$out/argocd" \
    github.com/argoproj/argo-cd/v3/cmd && k8s_go build -trimpath -ldflags "-s -w" -o "$out/kustomize" \
    sigs.k8s.io/kustomize/kustomize/v5) >>"$log" 2>&1 \
    || { tail -n 40 "$log" >&2; argocd_log "Argo CD build failed"; return 1; }
  for name in argocd-application-controller argocd-repo-server argocd-server; do
    ln -s argocd "$out/$name"
  done
  module="$(cd "$ARGOCD_SOURCES" && k8s_go list -m -f '{{.Dir}}' github.com/argoproj/argo-cd/v3)"
  cp "$module"/manifests/crds/*-crd.yaml "$out/crds/"
  chmod u+w "$out/crds/"*.yaml
  rm -rf "$TROUGHFILL_ARGOCD_BIN"
  mv "$out" "$TROUGHFILL_ARGOCD_BIN"
}

if ! argocd_built; then
  argocd_build
fi
argocd_log "Argo CD binaries in $TROUGHFILL_ARGOCD_BIN"
