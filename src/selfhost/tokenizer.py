"""Tokenization and chat templates, read from the checkpoint's tokenizer files.

Encoding, special tokens and the chat template are exactly transformers'
(`AutoTokenizer`), so prompts tokenize as the model's authors intended.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2

from selfhost.errors import InvalidParameterError, UnsupportedModelError


class TokenizerMismatchError(InvalidParameterError):
    """Two models that must read text into the same token ids (teacher and student, target and draft) do not."""


def check_same_tokenizer(first, second, first_rows: int, second_rows: int, roles: tuple[str, str],
                         purpose: str) -> None:
    """`first`, `second`: transformers tokenizers; `*_rows`: their models' vocabulary sizes; `roles` name the two
    models in the message and `purpose` says why they must agree. Compared id by id, end-of-text included."""
    a, b = roles
    if first_rows != second_rows:
        raise TokenizerMismatchError(f"{a} and {b} have different vocabularies ({first_rows} vs {second_rows} ids); "
                                     f"{purpose}")
    if first.get_vocab() != second.get_vocab() or first.eos_token_id != second.eos_token_id:
        raise TokenizerMismatchError(f"{a} and {b} have different tokenizers (same size, different tokens); {purpose}")


def check_text(text: str, field: str) -> str:
    """`text` if it can be encoded; a lone UTF-16 surrogate (JSON lets "\\ud800" through) is the caller's error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidParameterError(f"{field} contains a lone UTF-16 surrogate at character {err.start}: text must "
                                    "be valid Unicode", param=field.split("[")[0]) from None
    return text


class Tokenizer:
    def __init__(self, model_dir: Path):
        from transformers import AutoTokenizer

        try:
            self.hf = AutoTokenizer.from_pretrained(str(model_dir))
        except (OSError, ValueError) as err:
            raise UnsupportedModelError(f"cannot load a tokenizer from {model_dir}: {err}") from err
        self.eos_token_ids = self._eos_ids(model_dir)

    def _eos_ids(self, model_dir: Path) -> frozenset[int]:
        ids = set()
        if self.hf.eos_token_id is not None:
            ids.add(self.hf.eos_token_id)
        # generation_config.json often lists more end tokens (e.g. Llama 3's <|eot_id|>).
        gen_path = model_dir / "generation_config.json"
        if gen_path.exists():
            eos = json.loads(gen_path.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return frozenset(ids)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.hf.chat_template)

    def encode(self, text: str) -> list[int]:
        """Plain prompt: special tokens (e.g. BOS) added the way transformers adds them."""
        return self.hf.encode(check_text(text, "prompt"), add_special_tokens=True)

    @cached_property
    def longest_token_chars(self) -> int:
        """Characters the longest token can stand for: no text of more than n times this fits in n tokens.

        A token's vocabulary string has at least as many characters as the text it decodes to
        (byte-level BPE spells each byte as one character; SentencePiece writes the text), so
        this bound is safe and needs no decoding.
        """
        return max((len(piece) for piece in self.hf.get_vocab()), default=1)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs) -> str:
        if not self.has_chat_template:
            raise InvalidParameterError("this model's tokenizer has no chat_template; use a plain prompt instead")
        for i, message in enumerate(messages):
            content = message.get("content")
            if isinstance(content, str):
                check_text(content, f"messages[{i}].content")
        try:
            return self.hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
            )
        except jinja2.TemplateError as err:  # the template's own checks (roles must alternate, ...) are the caller's
            raise InvalidParameterError(f"the model's chat template refused these messages: {err}",
                                        param="messages") from err

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        # The rendered template already carries BOS and friends: add nothing more.
        text = self.render_chat(messages, add_generation_prompt, **kwargs)
        # Tool names and arguments reach the template too: check what it made, not only the contents.
        return self.hf.encode(check_text(text, "messages"), add_special_tokens=False)

    def decode(self, token_ids: list[int]) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """Text of one token as the OpenAI logprobs field shows it."""
        return self.hf.decode([token_id], skip_special_tokens=False)
