"""The folder and tensor names ONNX Runtime GenAI reads, in one place.

`onnxruntime-genai` loads a folder holding `genai_config.json`, the decoder
graph it names and the Hugging Face tokenizer files. The config says which graph
inputs and outputs carry the token ids, the attention mask, the logits and each
layer's past / present keys and values (`%d` is the layer index); the names here
are the ones its own model builder writes, so tools that expect that builder's
output read ours too. Source: the onnxruntime-genai config reference
(onnxruntime.ai/docs/genai/reference/config.html) and its model builder
(src/python/py/models/builder.py in microsoft/onnxruntime-genai), read for
version 0.18.
"""

from __future__ import annotations

from typing import Any

GENAI_CONFIG = "genai_config.json"
MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "model.onnx.data"  # external data: the weights, beside the graph
EXPORT_INFO = "selfhost_onnx.json"  # what selfhost exported, and how (read back by `LLM(DIR)`)

INPUT_IDS = "input_ids"  # int64 (batch, sequence)
ATTENTION_MASK = "attention_mask"  # int64 (batch, past + sequence): 1 for every real token so far
LOGITS = "logits"  # float32 (batch, sequence, vocab)
PAST_KEY = "past_key_values.%d.key"  # (batch, kv_heads, past, head_dim)
PAST_VALUE = "past_key_values.%d.value"
PRESENT_KEY = "present.%d.key"  # (batch, kv_heads, past + sequence, head_dim)
PRESENT_VALUE = "present.%d.value"

# Files copied from the checkpoint when present: the tokenizer for both runtimes, and
# config.json so the folder stays a Hugging Face model folder selfhost's tools can read.
CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                 "generation_config.json", "config.json", "chat_template.jinja")


def genai_config(
    model_type: str,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    hidden_size: int,
    vocab_size: int,
    context_length: int,
    bos_token_id: int | None,
    eos_token_ids: list[int],
    pad_token_id: int | None,
    generation: dict[str, Any],
) -> dict[str, Any]:
    """genai_config.json for a decoder graph with the names above.

    `past_present_share_buffer` is off: the graph returns present = past + new
    keys (GroupQueryAttention's separate-buffer mode), which is what the CPU
    provider runs.
    """
    eos = eos_token_ids[0] if len(eos_token_ids) == 1 else eos_token_ids
    return {
        "model": {
            "bos_token_id": bos_token_id,
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": head_dim,
                "hidden_size": hidden_size,
                "inputs": {
                    "input_ids": INPUT_IDS,
                    "attention_mask": ATTENTION_MASK,
                    "past_key_names": PAST_KEY,
                    "past_value_names": PAST_VALUE,
                },
                "outputs": {
                    "logits": LOGITS,
                    "present_key_names": PRESENT_KEY,
                    "present_value_names": PRESENT_VALUE,
                },
                "num_attention_heads": num_heads,
                "num_hidden_layers": num_layers,
                "num_key_value_heads": num_kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad_token_id if pad_token_id is not None else eos_token_ids[0],
            "type": model_type,
            "vocab_size": vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": bool(generation.get("do_sample", False)),
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": float(generation.get("repetition_penalty", 1.0)),
            "temperature": float(generation.get("temperature", 1.0)),
            "top_k": int(generation.get("top_k") or 50),
            "top_p": float(generation.get("top_p", 1.0)),
        },
    }
