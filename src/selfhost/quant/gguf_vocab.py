"""A Hugging Face tokenizer as GGUF tokenizer metadata (tokens, types, merges, specials).

Two vocabularies are supported, read from tokenizer.json's model section:
byte-level BPE (GPT-2, Llama 3, Qwen: llama.cpp's "gpt2" model) and BPE with
byte fallback (Llama 2, Mistral: llama.cpp's SentencePiece "llama" model).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from selfhost.errors import UnsupportedModelError

# Pre-tokenizer regexes llama.cpp knows by name; anything else gets "default".
_GPT2_PRE = "gpt-2"


def _merges(model: dict) -> list[str]:
    # tokenizers writes merges as "a b" strings (older) or [a, b] pairs (newer).
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _pre_name(tok: dict) -> str:
    pre = tok.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return _GPT2_PRE
    return "default"


def _adds_space_prefix(tok: dict) -> bool:
    """Whether tokenizer.json prepends "▁" to the text (Llama 2, Mistral) or not (Gemma).

    llama.cpp's SentencePiece tokenizer prepends a space unless the file says otherwise.
    """
    def steps(section: dict | None, key: str) -> list[dict]:
        if not section:
            return []
        return section.get(key, []) if section.get("type") == "Sequence" else [section]

    for step in steps(tok.get("normalizer"), "normalizers"):
        if step.get("type") == "Prepend" and step.get("prepend") == "\u2581":
            return True
    for step in steps(tok.get("pre_tokenizer"), "pretokenizers"):
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always" if step.get("add_prefix_space", True) else "never") != "never"
    return False


def write_vocab(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> None:
    """Add the tokenizer of `model_dir` to `writer`, padded to the model's `vocab_size` rows."""
    from transformers import AutoTokenizer

    path = model_dir / "tokenizer.json"
    if not path.exists():
        raise UnsupportedModelError(f"{model_dir} has no tokenizer.json; GGUF export needs a fast tokenizer")
    tok = json.loads(path.read_text())
    model = tok["model"]
    if model.get("type") != "BPE":
        raise UnsupportedModelError(
            f"tokenizer model {model.get('type')!r} cannot be exported to GGUF yet; supported: BPE"
        )
    hf = AutoTokenizer.from_pretrained(str(model_dir))
    # The tokenizer class may add tokens of its own (Qwen2 adds <|endoftext|>): ask it, not the file.
    id_to_token = {i: t for t, i in hf.get_vocab().items()}
    added = hf.added_tokens_decoder  # id -> AddedToken
    if max(id_to_token) >= vocab_size:
        raise UnsupportedModelError(f"tokenizer has id {max(id_to_token)}, beyond the model's {vocab_size} embeddings")

    byte_fallback = bool(model.get("byte_fallback"))
    tokens, types, scores = [], [], []
    for i in range(vocab_size):
        text = id_to_token.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif byte_fallback and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            tokens.append(text)
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.NORMAL)
        scores.append(-float(i))  # earlier entries merge first

    if byte_fallback:
        writer.add_tokenizer_model("llama")
        writer.add_add_space_prefix(_adds_space_prefix(tok))
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_name(tok))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(_merges(model))

    for key, token_id in (("bos", hf.bos_token_id), ("eos", hf.eos_token_id), ("pad", hf.pad_token_id),
                          ("unk", hf.unk_token_id)):
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(token_id)
    # What encode() really adds, whatever attribute names this tokenizer class uses.
    with_specials, without = hf.encode("a", add_special_tokens=True), hf.encode("a", add_special_tokens=False)
    writer.add_add_bos_token(hf.bos_token_id is not None and with_specials[:1] == [hf.bos_token_id] != without[:1])
    writer.add_add_eos_token(hf.eos_token_id is not None and with_specials[-1:] == [hf.eos_token_id] != without[-1:])
    if hf.chat_template:
        writer.add_chat_template(hf.chat_template)
