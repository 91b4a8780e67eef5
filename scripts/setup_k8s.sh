#!/usr/bin/env bash
# The local Kubernetes control plane's binaries: kube-apiserver, kube-scheduler,
# kube-controller-manager and kubectl built from the k8s.io/kubernetes module, and etcd from
# go.etcd.io/etcd/server/v3, both through the Go module proxy with the machine's Go
# (scripts/k8s/*/go.mod pin the versions; go.sum pins the bytes). Also installs openssl.
# Idempotent: the binaries are cached under $TROUGHFILL_CACHE/k8s/bin-<versions>-<go.sum hash> and
# built only when missing (a cold build takes about 10 minutes on 2 cores, most of it the API
# server; module downloads and the build cache stay in $TROUGHFILL_CACHE/go).
#
# Source it after scripts/setup.sh (it exports TROUGHFILL_K8S_BIN), or run it on its own.
set -euo pipefail

if ! declare -F apt_install >/dev/null; then
  # shellcheck source=scripts/setup.sh
  source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
fi

K8S_VERSION=1.37.2
ETCD_VERSION=3.6.16
K8S_SOURCES="$TROUGHFILL_REPO/scripts/k8s"
K8S_DIR="$TROUGHFILL_CACHE/k8s"
k8s_inputs="$(cat "$K8S_SOURCES"/*/go.mod "$K8S_SOURCES"/*/go.sum | sha256sum | cut -c1-12)"
TROUGHFILL_K8S_BIN="$K8S_DIR/bin-v$K8S_VERSION-etcd$ETCD_VERSION-$k8s_inputs"
export TROUGHFILL_K8S_BIN
K8S_TOOLS=(kube-apiserver kube-scheduler kube-controller-manager kubectl etcd)

k8s_log() { printf '[setup-k8s] %s\n' "$*" >&2; }

apt_install openssl

k8s_built() {
  local tool
  for tool in "${K8S_TOOLS[@]}"; do
    [ -x "$TROUGHFILL_K8S_BIN/$tool" ] || return 1
  done
}

k8s_go() {
  local go_bin
  go_bin="$(command -v go || true)"
  [ -n "$go_bin" ] || go_bin=/usr/local/go/bin/go
  [ -x "$go_bin" ] || { k8s_log "no Go toolchain (go on PATH or /usr/local/go/bin/go)"; return 1; }
  GOPATH="$TROUGHFILL_CACHE/go" GOMODCACHE="$TROUGHFILL_CACHE/go/mod" GOCACHE="$TROUGHFILL_CACHE/go/build" \
    GOTOOLCHAIN=local GOFLAGS=-mod=readonly CGO_ENABLED=0 "$go_bin" "$@"
}

k8s_build() {
  local out="$TROUGHFILL_K8S_BIN.tmp" log="$K8S_DIR/build.log"
  mkdir -p "$K8S_DIR"
  rm -rf "$out"
  mkdir -p "$out"
  : >"$log"
  # What `make` writes into a release build (hack/lib/version.sh): `kubectl version` and the
  # API server's /version report the release, not v0.0.0-master.
  local version_ldflags="" package
  for package in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    version_ldflags+=" -X $package.gitVersion=v$K8S_VERSION -X $package.gitMajor=${K8S_VERSION%%.*}"
    version_ldflags+=" -X $package.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2) -X $package.gitTreeState=clean"
    version_ldflags+=" -X $package.buildDate=1970-01-01T00:00:00Z"
  done
  k8s_log "building kube-apiserver, kube-scheduler, kube-controller-manager, kubectl v$K8S_VERSION (about 10 minutes on 2 cores the first time; log: $log)"
  (cd "$K8S_SOURCES/kubernetes" && k8s_go build -trimpath -ldflags "-s -w$version_ldflags" -o "$out/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kubectl) >>"$log" 2>&1 \
    || { tail -n 40 "$log" >&2; k8s_log "Kubernetes build failed"; return 1; }
  k8s_log "building etcd v$ETCD_VERSION"
  (cd "$K8S_SOURCES/etcd" && k8s_go build -trimpath -ldflags "-s -w" -o "$out/etcd" go.etcd.io/etcd/server/v3) \
    >>"$log" 2>&1 || { tail -n 40 "$log" >&2; k8s_log "etcd build failed"; return 1; }
  rm -rf "$TROUGHFILL_K8S_BIN"
  mv "$out" "$TROUGHFILL_K8S_BIN"
}

if ! k8s_built; then
  k8s_build
fi
k8s_log "control-plane binaries in $TROUGHFILL_K8S_BIN"

# argocd-lua: Argo CD's Lua health checks and actions run as Argo CD runs them (gopher-lua),
# on manifests/argocd/resource_customizations (scripts/argocd-lua; seconds to build).
lua_inputs="$(cat "$TROUGHFILL_REPO"/scripts/argocd-lua/go.mod "$TROUGHFILL_REPO"/scripts/argocd-lua/go.sum \
  "$TROUGHFILL_REPO"/scripts/argocd-lua/*.go | sha256sum | cut -c1-12)"
TROUGHFILL_ARGOCD_LUA="$TROUGHFILL_CACHE/argocd-lua/$lua_inputs/argocd-lua"
export TROUGHFILL_ARGOCD_LUA
argocd_lua_build() {
  mkdir -p "$(dirname "$TROUGHFILL_ARGOCD_LUA")" "$K8S_DIR"
  (cd "$TROUGHFILL_REPO/scripts/argocd-lua" && k8s_go build -trimpath -o "$TROUGHFILL_ARGOCD_LUA.tmp" .) \
    >>"$K8S_DIR/build.log" 2>&1 || { tail -n 20 "$K8S_DIR/build.log" >&2; k8s_log "argocd-lua build failed"; return 1; }
  mv "$TROUGHFILL_ARGOCD_LUA.tmp" "$TROUGHFILL_ARGOCD_LUA"
}
[ -x "$TROUGHFILL_ARGOCD_LUA" ] || argocd_lua_build
k8s_log "argocd-lua in $TROUGHFILL_ARGOCD_LUA"
