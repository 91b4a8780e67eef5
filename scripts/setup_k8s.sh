#!/usr/bin/env bash
# The local Kubernetes control plane's binaries: kube-apiserver, kube-scheduler,
# kube-controller-manager and kubectl 1.20.2, built from Debian bookworm's source package
# `kubernetes` (the full upstream tree with vendor/) with Debian's Go: no downloads besides
# Debian's own archive. Also installs etcd-server and openssl. Idempotent: the binaries are
# cached under $TROUGHFILL_CACHE/k8s/bin-<version> and built only when missing (a cold build
# takes about 8 minutes on 2 cores).
#
# Source it after scripts/setup.sh (it exports TROUGHFILL_K8S_BIN), or run it on its own.
set -euo pipefail

if ! declare -F apt_install >/dev/null; then
  # shellcheck source=scripts/setup.sh
  source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
fi

K8S_VERSION=1.20.2
K8S_DIR="$TROUGHFILL_CACHE/k8s"
TROUGHFILL_K8S_BIN="$K8S_DIR/bin-$K8S_VERSION"
export TROUGHFILL_K8S_BIN
K8S_TOOLS=(kube-apiserver kube-scheduler kube-controller-manager kubectl)

k8s_log() { printf '[setup-k8s] %s\n' "$*" >&2; }

apt_install etcd-server openssl

k8s_built() {
  local tool
  for tool in "${K8S_TOOLS[@]}"; do
    [ -x "$TROUGHFILL_K8S_BIN/$tool" ] || return 1
  done
}

k8s_build() {
  apt_install golang-go make rsync dpkg-dev golang-github-modern-go-reflect2-dev
  local sources=/etc/apt/sources.list.d/troughfill-deb-src.sources
  if ! apt-get source --print-uris kubernetes >/dev/null 2>&1; then
    k8s_log "adding a deb-src entry for bookworm (apt-get source needs one)"
    printf 'Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      | as_root tee "$sources" >/dev/null
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  fi
  local work="$K8S_DIR/src"
  mkdir -p "$work"
  if ! ls "$work"/kubernetes_*.dsc >/dev/null 2>&1; then
    k8s_log "downloading Debian's kubernetes source package"
    (cd "$work" && apt-get source -q --download-only kubernetes >"$K8S_DIR/source.log" 2>&1) \
      || { tail -n 20 "$K8S_DIR/source.log" >&2; return 1; }
  fi
  local tree="$work/tree"
  rm -rf "$tree"
  k8s_log "unpacking the source"
  # Only the upstream tarball: Debian's patches are for its own packaging of the client parts.
  mkdir -p "$tree"
  tar -xzf "$(ls "$work"/kubernetes_*.orig.tar.gz | head -n 1)" -C "$tree" --strip-components=1

  # The vendored reflect2 v1.0.1 segfaults on Go >= 1.18 at the first custom-resource write
  # (it reads runtime internals that moved); Debian's 1.0.2 is the fixed release.
  local reflect2=/usr/share/gocode/src/github.com/modern-go/reflect2
  [ -d "$reflect2" ] || { k8s_log "$reflect2 missing"; return 1; }
  rm -rf "$tree/vendor/github.com/modern-go/reflect2"
  mkdir -p "$tree/vendor/github.com/modern-go/reflect2"
  cp -r "$reflect2"/. "$tree/vendor/github.com/modern-go/reflect2/"
  find "$tree/vendor/github.com/modern-go/reflect2" -name '*_test.go' -delete
  sed -i 's#github.com/modern-go/reflect2 v1.0.1#github.com/modern-go/reflect2 v1.0.2#' \
    "$tree/go.mod" "$tree/vendor/modules.txt"
  # go.sum lines for the old version are harmless with -mod=vendor; staging modules pin it too.
  grep -rl 'github.com/modern-go/reflect2 v1.0.1' "$tree/staging" --include=go.mod 2>/dev/null \
    | xargs -r sed -i 's#github.com/modern-go/reflect2 v1.0.1#github.com/modern-go/reflect2 v1.0.2#'

  k8s_log "building ${K8S_TOOLS[*]} (several minutes on a small machine; log: $K8S_DIR/build.log)"
  local what=""
  local tool
  for tool in "${K8S_TOOLS[@]}"; do what="$what cmd/$tool"; done
  (
    cd "$tree"
    export GOFLAGS=-mod=vendor GOPROXY=off GO111MODULE=on GOTOOLCHAIN=local
    export KUBE_GIT_VERSION="v$K8S_VERSION" KUBE_GIT_TREE_STATE=clean KUBE_GIT_COMMIT=debian-source
    make WHAT="${what# }" KUBE_BUILD_PLATFORMS=linux/amd64 GOLDFLAGS="-s -w"
  ) >"$K8S_DIR/build.log" 2>&1 || { tail -n 40 "$K8S_DIR/build.log" >&2; k8s_log "build failed"; return 1; }
  local out="$tree/_output/local/bin/linux/amd64"
  [ -d "$out" ] || out="$tree/_output/bin"
  mkdir -p "$TROUGHFILL_K8S_BIN.tmp"
  for tool in "${K8S_TOOLS[@]}"; do
    cp "$out/$tool" "$TROUGHFILL_K8S_BIN.tmp/$tool"
  done
  rm -rf "$TROUGHFILL_K8S_BIN"
  mv "$TROUGHFILL_K8S_BIN.tmp" "$TROUGHFILL_K8S_BIN"
  rm -rf "$tree"  # about 1 GB of sources and objects; the tarball stays for a rebuild
}

if ! k8s_built; then
  k8s_build
fi
k8s_log "control-plane binaries in $TROUGHFILL_K8S_BIN"
