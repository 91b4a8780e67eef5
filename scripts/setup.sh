#!/usr/bin/env bash
# Idempotent setup for a Debian 12 machine with Python 3.11: system packages the tests and the
# demo run for real (redis-server, prometheus), and a virtual environment with the project and
# its dev tools. Caches live outside the repository, under $TROUGHFILL_CACHE.
# Source it (it exports PATH and TROUGHFILL_*), or run it once on its own.
set -euo pipefail

TROUGHFILL_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TROUGHFILL_CACHE="${TROUGHFILL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/troughfill}"
TROUGHFILL_VENV="${TROUGHFILL_VENV:-$TROUGHFILL_CACHE/venv}"
export TROUGHFILL_REPO TROUGHFILL_CACHE TROUGHFILL_VENV
mkdir -p "$TROUGHFILL_CACHE"

log() { printf '[setup] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi
}

apt_install() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  # Packages must not start system-wide daemons: tests and the demo start their own on free ports.
  local policy=/usr/sbin/policy-rc.d made_policy=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
    as_root chmod 755 "$policy"
    made_policy=1
  fi
  local lists_age=$(( $(date +%s) - $(stat -c %Y /var/lib/apt/lists 2>/dev/null || echo 0) ))
  if [ "$lists_age" -gt 21600 ] || ! apt-cache policy "${missing[0]}" 2>/dev/null | grep -q Candidate; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  fi
  local status=0
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    >"$TROUGHFILL_CACHE/apt.log" 2>&1 || status=$?
  [ -n "$made_policy" ] && as_root rm -f "$policy"
  if [ "$status" -ne 0 ]; then
    tail -n 30 "$TROUGHFILL_CACHE/apt.log" >&2
    log "apt-get install failed"
    return "$status"
  fi
}

# Debian's python3 lacks ensurepip until python3-venv is installed.
python3 -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
  || { log "Python >= 3.11 is required"; exit 1; }
python3 -c 'import ensurepip' 2>/dev/null || apt_install python3-venv
apt_install redis-server prometheus openssl

# The venv is reused across checkouts; the stamp makes it reinstall when the project's
# dependencies or the checkout it points at change.
want_stamp="$(cat "$TROUGHFILL_REPO/pyproject.toml" "$TROUGHFILL_REPO/dev/pyproject.toml" | sha256sum | cut -d' ' -f1) $TROUGHFILL_REPO"
if [ ! -x "$TROUGHFILL_VENV/bin/python" ] || [ "$(cat "$TROUGHFILL_VENV/.stamp" 2>/dev/null)" != "$want_stamp" ]; then
  log "installing the project and its dev tools into $TROUGHFILL_VENV"
  [ -x "$TROUGHFILL_VENV/bin/python" ] || python3 -m venv "$TROUGHFILL_VENV"
  "$TROUGHFILL_VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$TROUGHFILL_REPO[dev,sim]" -e "$TROUGHFILL_REPO/dev" \
    >"$TROUGHFILL_CACHE/pip.log" 2>&1 || { tail -n 40 "$TROUGHFILL_CACHE/pip.log" >&2; log "pip install failed"; exit 1; }
  echo "$want_stamp" >"$TROUGHFILL_VENV/.stamp"
fi

export PATH="$TROUGHFILL_VENV/bin:$PATH"
