"""Token counting for prompts and replies when a server does not report `usage`.

A Hugging Face tokenizer (local folder or Hub id, given with `--tokenizer`) is
loaded lazily, so the bench command does not pay for transformers unless asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from selfhost.errors import SelfhostError


class TokenizerLoadError(SelfhostError):
    """A `--tokenizer` reference that transformers could not load."""


@dataclass(frozen=True)
class TokenCounter:
    """Counts and cuts text in the token units of one tokenizer."""

    name: str
    tokenizer: Any  # transformers.PreTrainedTokenizerBase

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def truncate(self, text: str, num_tokens: int) -> str:
        ids = self.tokenizer.encode(text, add_special_tokens=False)[:num_tokens]
        return self.tokenizer.decode(ids)


def load_token_counter(name: str) -> TokenCounter:
    """Load a tokenizer by folder or Hub id; failure is a user error naming it."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise TokenizerLoadError(f"cannot load tokenizer {name!r}: {err}") from None
    return TokenCounter(name, tokenizer)
