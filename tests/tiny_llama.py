"""Writes a tiny random-weight Llama (few layers, GQA) with a word-level tokenizer
to a folder, so vLLM can load it offline: `python tests/tiny_llama.py DIR`."""
from __future__ import annotations

import json
import os
import random
import sys

WORDS = [f"w{i}" for i in range(500)]


def write_tiny_llama(path: str, *, num_layers: int = 2, seed: int = 0) -> str:
    """Save model + tokenizer under `path` (created) and return it."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    os.makedirs(path, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)

    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=128, intermediate_size=256, num_hidden_layers=num_layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
                      bos_token_id=1, eos_token_id=2, initializer_range=0.5, tie_word_embeddings=False,
                      torch_dtype="float32")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path, safe_serialization=True)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, f)
    return path


def prompts(n: int, lengths: list[int], seed: int = 0) -> list[str]:
    """`n` prompts of random words, the i-th with `lengths[i % len(lengths)]` words."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(lengths[i % len(lengths)])) for i in range(n)]


if __name__ == "__main__":
    print(write_tiny_llama(sys.argv[1]))
