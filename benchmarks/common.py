"""Shared set-up for the CPU benchmarks: the ~125M Llama-shaped random model and random prompts.

Importing this module loads no torch (the peer benchmarks' driver stays light);
`python -m benchmarks.common DIR` builds the model into DIR.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

# The shape the engine issues measure on (SmolLM-135M-like).
LLAMA_125M = dict(
    vocab_size=32000,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)


def build_llama_125m(out_dir: Path, seed: int = 0) -> Path:
    """Save a random-weight Llama of the benchmark shape (with a tiny tokenizer) once."""
    if (out_dir / "model.safetensors").exists():
        return out_dir
    import torch
    import transformers

    from tests.tiny_models import save_tiny_tokenizer

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**LLAMA_125M)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    save_tiny_tokenizer(out_dir)
    return out_dir


def make_prompts(n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    """`n` prompts of random token ids (3 and up: past pad, bos and eos), lengths drawn from [lo, hi]."""
    rng = random.Random(seed)
    return [[rng.randrange(3, LLAMA_125M["vocab_size"]) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


if __name__ == "__main__":
    print(build_llama_125m(Path(sys.argv[1])))
