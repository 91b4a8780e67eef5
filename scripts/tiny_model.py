"""Build a tiny random-weight Llama model and a locally trained BPE tokenizer, for tests.

Runs in the vLLM virtual environment (it needs transformers, tokenizers and torch):

    python scripts/tiny_model.py OUTPUT_DIR

Nothing is downloaded: the tokenizer is trained on text generated here, the weights are
random (seeded), head size 64 (the CPU attention kernels support no smaller). The model
talks nonsense, fast, which is all an engine test needs: real tokenization,
a real chat template, real sampling, real KV cache.
"""

import json
import random
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}"
    "{% if not loop.last or message['role'] != 'assistant' %}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL = ["<unk>", "<s>", "</s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
VOCABULARY = (
    "the a an ticket customer billing refund login password account shipping order delivery bug "
    "report feature request team engineering logistics accounts support route classify reply "
    "with one word please thanks hello urgent angry polite confused about issue problem help "
    "record summary extract score label positive negative neutral yes no maybe"
)
WORDS = VOCABULARY.split()


def corpus(lines: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 20))]
        out.append(" ".join(words) + rng.choice([".", "?", "!", ""]) + f" {rng.randint(0, 999)}")
    return out


def build(target: Path, seed: int = 0) -> None:
    target.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # No full byte alphabet: a random model that can emit a lone UTF-8 continuation byte
    # produces text that never decodes. Only characters of the corpus (printable ASCII).
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL)
    tokenizer.train_from_iterator(corpus(5000, seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(target)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Random weights favour whatever token they favour; zeroing the special tokens' rows of
        # the (tied) embedding keeps them out of greedy output, so answers are visible text.
        model.get_input_embeddings().weight[: len(SPECIAL)] = 0.0
    model.save_pretrained(target, safe_serialization=True)
    (target / "generation_config.json").write_text(
        json.dumps({"bos_token_id": fast.bos_token_id, "eos_token_id": fast.eos_token_id, "do_sample": True})
    )


if __name__ == "__main__":
    build(Path(sys.argv[1]))
    print(sys.argv[1])
