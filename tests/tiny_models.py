"""Tiny random-weight checkpoints, one per supported architecture.

Each config switches on the family's special features (GQA, sliding windows
shorter than the test prompts, soft-capping, q/k norm, biases, tied and
untied embeddings, rope scaling, explicit head_dim) and is saved with
transformers' own `save_pretrained`, so selfhost loads exactly what users have.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# Mixture-of-experts families (tests/models/test_moe.py, the decode runner's tests): Mixtral's experts as
# wide as a dense MLP; Qwen2-MoE with a shared expert and a dense layer between sparse ones; Qwen3-MoE
# with q/k norms and renormalised top-k.
MOE_CONFIGS = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=48, norm_topk_prob=False,
                                         decoder_sparse_step=1, mlp_only_layers=[1])),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16,
                                         norm_topk_prob=True)),
}


TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    # widths that are no multiple of 32 (the demo model's MLP is 432 wide): the bf16 kernels' padded tails
    "llama-odd-widths": ("LlamaConfig", dict(hidden_size=80, intermediate_size=72, num_attention_heads=5,
                                             num_key_value_heads=1)),
    "llama3-rope": (
        "LlamaConfig",
        dict(
            tie_word_embeddings=True,
            attention_bias=True,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
            rope_theta=500000.0,
        ),
    ),
    "llama-linear-rope": (
        "LlamaConfig",
        dict(head_dim=32, rope_scaling=dict(rope_type="linear", factor=2.0)),
    ),
    "mistral": ("MistralConfig", dict(sliding_window=16, head_dim=16)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=False)),
    "gemma": ("GemmaConfig", dict(head_dim=24, num_key_value_heads=1)),
    "gemma2": (
        "Gemma2Config",
        dict(
            head_dim=16,
            sliding_window=16,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            num_hidden_layers=4,
        ),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            head_dim=32,
            sliding_window=16,
            query_pre_attn_scalar=32,
            num_hidden_layers=4,
            sliding_window_pattern=2,
            rope_scaling=dict(rope_type="linear", factor=4.0),
        ),
    ),
    "phi3": (
        "Phi3Config",
        dict(
            num_key_value_heads=2,
            sliding_window=20,
            original_max_position_embeddings=128,
            max_position_embeddings=512,
            rope_scaling=dict(
                type="longrope",
                short_factor=[1.0 + 0.05 * i for i in range(8)],
                long_factor=[1.5 + 0.1 * i for i in range(8)],
            ),
        ),
    ),
}


def make_tiny_model(name: str, out_dir: Path, seed: int = 0, **changes) -> Path:
    """`changes` override the family's config fields (a variant for one test)."""
    config_cls, overrides = TINY_CONFIGS[name]
    config = getattr(transformers, config_cls)(**{**COMMON, **overrides, **changes})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init leaves norms at exactly 1 (or 0 for Gemma); perturb them so a
    # wrong norm convention cannot pass unnoticed.
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. "
    "Héllo wörld — naïve café, 東京 and emoji 🙂 test lines for byte-level merges. "
) * 20


def save_tiny_tokenizer(out_dir: Path, vocab_size: int = 400) -> None:
    """A byte-level BPE tokenizer small enough for the tiny models' vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([_CORPUS], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", add_bos_token=True
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    fast.save_pretrained(out_dir)


def make_tiny_checkpoint(name: str, out_dir: Path, seed: int = 0, **changes) -> Path:
    """Model + tokenizer: a folder `LLM(...)` can load."""
    make_tiny_model(name, out_dir, seed, **changes)
    save_tiny_tokenizer(out_dir)
    return out_dir
