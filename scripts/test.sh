#!/usr/bin/env bash
# Set everything up (idempotent; the first run downloads the vLLM CPU engine, a few GB, converts
# the SmolLM2 model and builds the local Kubernetes control plane from its Go modules, about 10
# minutes; KEDA and Argo CD from theirs, for the side-by-side benchmark and the GitOps tests) and
# run every check: ruff, mypy --strict, import-linter, pytest (every tier: unit, manifests,
# integration, engine, e2e with the CEL and Argo CD tiers, install).
# Extra arguments go to pytest (e.g. scripts/test.sh -k crds).
set -euo pipefail
# shellcheck source=scripts/setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
# shellcheck source=scripts/setup_vllm.sh
source "$TROUGHFILL_REPO/scripts/setup_vllm.sh"
# shellcheck source=scripts/setup_demo.sh
source "$TROUGHFILL_REPO/scripts/setup_demo.sh"
# shellcheck source=scripts/setup_k8s.sh
source "$TROUGHFILL_REPO/scripts/setup_k8s.sh"
# shellcheck source=scripts/setup_keda.sh
source "$TROUGHFILL_REPO/scripts/setup_keda.sh"
# shellcheck source=scripts/setup_argocd.sh
source "$TROUGHFILL_REPO/scripts/setup_argocd.sh"
cd "$TROUGHFILL_REPO"

echo "== ruff"
ruff check operator dev tests scripts
ruff format --check operator dev tests scripts
echo "== mypy --strict"
mypy
echo "== import-linter"
lint-imports --no-cache
echo "== pytest"
status=0
python -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$status"
