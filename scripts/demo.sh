#!/usr/bin/env bash
# Set everything up (idempotent; the first run downloads the vLLM CPU engine, a few GB, builds
# the local Kubernetes control plane from its Go modules, about 10 minutes, and converts the
# SmolLM2 model) and run the main job: the embedded example on a local cluster, end to end.
# Extra arguments go to `troughfill-dev demo` (e.g. --check-only, --seconds-per-hour 20).
set -euo pipefail
# shellcheck source=scripts/setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
# shellcheck source=scripts/setup_vllm.sh
source "$TROUGHFILL_REPO/scripts/setup_vllm.sh"
# shellcheck source=scripts/setup_demo.sh
source "$TROUGHFILL_REPO/scripts/setup_demo.sh"
# shellcheck source=scripts/setup_k8s.sh
source "$TROUGHFILL_REPO/scripts/setup_k8s.sh"
cd "$TROUGHFILL_REPO"
exec troughfill-dev demo "$@"
