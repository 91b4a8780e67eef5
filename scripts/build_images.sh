#!/usr/bin/env bash
# Build the operator image for real, with Debian's buildah (vfs storage: no daemon), from a
# Debian bookworm base made with debootstrap: no image registry is reachable here. Elsewhere,
# build it the usual way (`docker build -f images/operator.Containerfile .`): the Containerfile
# then starts from python:3.11-slim.
# Runs `troughfill --help` in the image and prints its size. Idempotent: the base is made once
# and cached under $TROUGHFILL_CACHE/images. Prints one JSON line: image, size, build seconds.
# Needs root (debootstrap, buildah's vfs storage).
set -euo pipefail
# shellcheck source=scripts/setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"

apt_install buildah runc debootstrap
IMAGES="$TROUGHFILL_CACHE/images"
ROOTFS="$IMAGES/bookworm-python"
BASE=localhost/troughfill-base:bookworm-python3.11
TAG="${TROUGHFILL_IMAGE_TAG:-troughfill/operator:0.1.0}"
mkdir -p "$IMAGES"
buildah_() { buildah --storage-driver vfs --root "$IMAGES/storage" --runroot "$IMAGES/run" "$@"; }
log() { printf '[images] %s\n' "$*" >&2; }

if [ ! -x "$ROOTFS/usr/bin/python3" ]; then
  log "debootstrap: Debian bookworm with python3 into $ROOTFS (a few minutes, once)"
  rm -rf "$ROOTFS.tmp"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$ROOTFS.tmp" http://deb.debian.org/debian >"$IMAGES/debootstrap.log" 2>&1 \
    || { tail -n 20 "$IMAGES/debootstrap.log" >&2; exit 1; }
  rm -rf "$ROOTFS.tmp"/var/cache/apt/archives/*.deb "$ROOTFS.tmp"/var/lib/apt/lists/*
  mv "$ROOTFS.tmp" "$ROOTFS"
fi
if ! buildah_ inspect --type image "$BASE" >/dev/null 2>&1; then
  log "importing the base as $BASE"
  container="$(buildah_ from scratch)"
  mountpoint="$(buildah_ mount "$container")"
  cp -a "$ROOTFS"/. "$mountpoint"/
  buildah_ umount "$container" >/dev/null
  buildah_ config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$container"
  buildah_ commit --quiet "$container" "$BASE" >/dev/null
  buildah_ rm "$container" >/dev/null
fi

log "building $TAG from $BASE"
started=$(date +%s)
# The build reaches PyPI through this machine's network and its CA bundle and pip settings,
# mounted for the build steps only (nothing of them is in the image).
volumes=()
for file in /etc/ssl/certs/ca-certificates.crt /etc/pip.conf; do
  [ -f "$file" ] && volumes+=(--volume "$file:$file:ro")
done
buildah_ build --quiet --isolation chroot --network host "${volumes[@]}" \
  --build-arg "BASE=$BASE" -f "$TROUGHFILL_REPO/images/operator.Containerfile" -t "$TAG" \
  "$TROUGHFILL_REPO" >"$IMAGES/build.log" 2>&1 || { tail -n 30 "$IMAGES/build.log" >&2; exit 1; }
seconds=$(( $(date +%s) - started ))
buildah_ rmi --prune >/dev/null 2>&1 || true  # the build stage and earlier builds of the tag

# What runs in the image: as its user, from its entrypoint.
container="$(buildah_ from "$TAG")"
trap 'buildah_ rm "$container" >/dev/null 2>&1 || true' EXIT
help="$(buildah_ run --isolation chroot "$container" -- troughfill --help)"
grep -q "usage: troughfill" <<<"$help" || { echo "$help" >&2; log "troughfill --help failed in the image"; exit 1; }
user="$(buildah_ inspect --format '{{.OCIv1.Config.User}}' "$TAG")"
entrypoint="$(buildah_ inspect --format '{{.OCIv1.Config.Entrypoint}}' "$TAG")"
size="$(buildah_ images --format '{{.Size}}' "$TAG" | head -n 1)"
printf '{"image": "%s", "size": "%s", "user": "%s", "entrypoint": "%s", "buildSeconds": %d, "help": "%s"}\n' \
  "$TAG" "$size" "$user" "$entrypoint" "$seconds" "$(head -n 1 <<<"$help")"
