#!/usr/bin/env bash
# Set everything up (idempotent) and run the main job on the embedded example.
set -euo pipefail
# shellcheck source=scripts/setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$TROUGHFILL_REPO"
exec troughfill demo "$@"
