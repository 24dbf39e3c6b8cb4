"""Incremental detokenization with stop strings.

Text is released only when it is final: never half of a multi-byte UTF-8
character (a byte-level BPE token may end mid-character), and never the
beginning of what might become a stop string.
"""

from __future__ import annotations

from collections.abc import Callable

from selfhost.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


def window_decoder(tokenizer: Tokenizer) -> Callable[[list[int]], str]:
    """`tokenizer.decode`, or the same decode without transformers' wrapper where that gives the same
    text: a fast tokenizer whose decode is the library's own and that cleans up no spaces. The wrapper's
    argument checks cost ~10 us of the two decodes each generated token takes (a ~0.5 ms demo-model step)."""
    try:
        from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast
    except ImportError:
        return tokenizer.decode
    hf = getattr(tokenizer, "hf", None)
    if (type(tokenizer).decode is not Tokenizer.decode or not isinstance(hf, PreTrainedTokenizerFast)
            or type(hf).decode is not PreTrainedTokenizerBase.decode
            or type(hf)._decode is not PreTrainedTokenizerFast._decode or hf.clean_up_tokenization_spaces):
        return tokenizer.decode
    backend_decode = hf.backend_tokenizer.decode
    return lambda token_ids: backend_decode(token_ids, skip_special_tokens=True)


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self._decode = window_decoder(tokenizer)
        self.stop = stop
        self.token_ids: list[int] = []
        # Decoding a short window of trailing tokens keeps each step O(1); the
        # window starts a few tokens back so merges across tokens decode right.
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""  # all final text so far (stop string removed)
        self._emitted = 0  # characters of `text` handed out by take_delta()
        self.stopped = False

    def add(self, token_id: int) -> None:
        """Append one generated token; sets `stopped` when a stop string appears."""
        self.token_ids.append(token_id)
        self._release()

    def add_many(self, token_ids: list[int]) -> None:
        """Append several tokens at once (a verified speculative run), decoding their window once.

        Only without stop strings: with them, the token that completes one must be found (`add` each)."""
        assert not self.stop, "add_many cannot tell which token completed a stop string"
        self.token_ids.extend(token_ids)
        self._release()

    def _release(self) -> None:
        window_before = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        window_now = self._decode(self.token_ids[self._prefix_offset :])
        if len(window_now) <= len(window_before) or window_now.endswith(REPLACEMENT_CHAR):
            return  # nothing final yet: wait for the rest of the character
        new_text = window_now[len(window_before) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        self._append(new_text)

    def flush(self) -> None:
        """At the end of generation, keep whatever the last tokens decode to."""
        if self.stopped or self._read_offset == len(self.token_ids):
            return
        window_before = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        window_now = self._decode(self.token_ids[self._prefix_offset :])
        self._read_offset = len(self.token_ids)
        self._append(window_now[len(window_before) :])

    def _append(self, new_text: str) -> None:
        if not self.stop:  # the common case, once per generated token: no search to set up
            self.text += new_text
            return
        search_from = max(0, len(self.text) - max(len(s) for s in self.stop) + 1)
        self.text += new_text
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i != -1]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def take_delta(self, final: bool = False) -> str:
        """Text that is safe to show now; `final=True` releases everything held back."""
        end = len(self.text) if final or self.stopped else len(self.text) - self._held_back()
        delta = self.text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return delta

    def _held_back(self) -> int:
        # Longest tail of the text that could still grow into a stop string.
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest
