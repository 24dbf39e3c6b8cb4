"""`response_format: {"type": "json_object"}`: constrained decoding to a JSON object.

A logits processor keeps only tokens after which the output is still the prefix
of a JSON object that can be closed within the tokens left, and once the
object is closed, only end-of-sequence tokens. It rides on SamplingParams as
`logits_processors`, which layers/sampler.py applies per row.

Limits (documented in docs/SERVER.md): candidates are the 64 most likely tokens
(the whole vocabulary only when none of them fits), whitespace outside strings
is not generated, and a request cut short by `max_tokens` still ends in a
complete object because the closing budget is reserved up front.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from selfhost.sampling_params import SamplingParams

NUM_CANDIDATES = 64
_LITERALS = {"t": "rue", "f": "alse", "n": "ull"}
_ESCAPES = set('"\\/bfnrtu')
_HEX = set("0123456789abcdefABCDEF")
# Number sub-states that may end the number.
_NUM_FINAL = {"zero", "int", "frac", "exp"}


def with_processors(params: SamplingParams, *processors) -> SamplingParams:
    """A copy of `params` that also runs `processors` on its logits (SamplingParams.logits_processors)."""
    return replace(params, logits_processors=params.logits_processors + tuple(processors))


class JsonPrefix:
    """Incremental recogniser of a JSON object prefix; `feed` returns False on the first bad char."""

    __slots__ = ("stack", "mode", "aux")

    def __init__(self, stack: tuple = (), mode: str = "start", aux=None):
        self.stack, self.mode, self.aux = stack, mode, aux

    def copy(self) -> JsonPrefix:
        return JsonPrefix(self.stack, self.mode, self.aux)

    @property
    def is_done(self) -> bool:
        return self.mode == "done"

    def chars_to_close(self) -> int:
        """Fewest characters that complete the document from here."""
        open_containers = len(self.stack)
        extra = {
            "start": 2, "done": 0, "value": 1, "arr_first": 0, "obj_first": 0, "obj_key": 4,
            "colon": 2, "after": 0, "str": 1, "key": 3, "str_esc": 2, "key_esc": 4,
        }.get(self.mode)
        if extra is None:
            if self.mode in ("str_u", "key_u"):
                extra = self.aux + (1 if self.mode == "str_u" else 3)
            elif self.mode == "lit":
                extra = len(self.aux)
            else:  # number
                extra = 0 if self.aux in _NUM_FINAL else 1
        if self.mode == "start":
            open_containers = 0
        return extra + open_containers

    def feed_text(self, text: str) -> bool:
        return all(self.feed(c) for c in text)

    def feed(self, c: str) -> bool:
        mode = self.mode
        if mode == "start":
            return self._open("o") if c == "{" else False
        if mode in ("str", "key"):
            if c == '"':
                self.mode = "after" if mode == "str" else "colon"
            elif c == "\\":
                self.mode = mode + "_esc"
            elif ord(c) < 0x20:
                return False
            return True
        if mode in ("str_esc", "key_esc"):
            if c not in _ESCAPES:
                return False
            base = mode.removesuffix("_esc")
            self.mode, self.aux = (base + "_u", 4) if c == "u" else (base, None)
            return True
        if mode in ("str_u", "key_u"):
            if c not in _HEX:
                return False
            self.aux -= 1
            if self.aux == 0:
                self.mode, self.aux = mode.removesuffix("_u"), None
            return True
        if mode == "lit":
            if c != self.aux[0]:
                return False
            self.aux = self.aux[1:]
            if not self.aux:
                self.mode, self.aux = "after", None
            return True
        if mode == "num":
            return self._number(c)
        if mode == "obj_first":
            if c == "}":
                return self._close("o")
            return self._key_start(c)
        if mode == "obj_key":
            return self._key_start(c)
        if mode == "colon":
            if c != ":":
                return False
            self.mode = "value"
            return True
        if mode == "arr_first" and c == "]":
            return self._close("a")
        if mode in ("value", "arr_first"):
            return self._value_start(c)
        if mode == "after":
            top = self.stack[-1]
            if c == ",":
                self.mode = "obj_key" if top == "o" else "value"
                return True
            if c == ("}" if top == "o" else "]"):
                return self._close(top)
            return False
        return False  # done: nothing may follow

    def _open(self, kind: str) -> bool:
        self.stack += (kind,)
        self.mode = "obj_first" if kind == "o" else "arr_first"
        return True

    def _close(self, kind: str) -> bool:
        self.stack = self.stack[:-1]
        self.mode = "after" if self.stack else "done"
        return True

    def _key_start(self, c: str) -> bool:
        if c != '"':
            return False
        self.mode = "key"
        return True

    def _value_start(self, c: str) -> bool:
        if c == "{":
            return self._open("o")
        if c == "[":
            return self._open("a")
        if c == '"':
            self.mode = "str"
            return True
        if c in _LITERALS:
            self.mode, self.aux = "lit", _LITERALS[c]
            return True
        if c == "-" or c.isdigit():
            self.mode, self.aux = "num", ("minus" if c == "-" else "zero" if c == "0" else "int")
            return True
        return False

    def _number(self, c: str) -> bool:
        sub = self.aux
        digit = "0" <= c <= "9"
        if digit:
            nxt = {"minus": "zero" if c == "0" else "int", "int": "int", "dot": "frac", "frac": "frac",
                   "e": "exp", "esign": "exp", "exp": "exp"}.get(sub)
        elif c == "." and sub in ("zero", "int"):
            nxt = "dot"
        elif c in "eE" and sub in ("zero", "int", "frac"):
            nxt = "e"
        elif c in "+-" and sub == "e":
            nxt = "esign"
        else:
            nxt = None
        if nxt is not None:
            self.aux = nxt
            return True
        if sub not in _NUM_FINAL:
            return False
        self.mode, self.aux = "after", None  # the number ended; this char belongs to what follows
        return self.feed(c)


class JsonVocab:
    """Each token's text as it reads in running output (built once per model)."""

    def __init__(self, tokenizer):
        hf = tokenizer.hf
        size = len(hf)
        # Decode after an anchor token so tokenizers that drop a leading space on
        # a lone token (SentencePiece) still show it.
        anchor = hf.encode("a", add_special_tokens=False)[-1]
        anchor_len = len(hf.decode([anchor]))
        texts = hf.batch_decode([[anchor, i] for i in range(size)], skip_special_tokens=False)
        special = set(hf.all_special_ids)
        self.texts: list[str | None] = [
            None if i in special or "\ufffd" in t or not t[anchor_len:] else t[anchor_len:]
            for i, t in enumerate(texts)
        ]
        self.eos_ids = sorted(tokenizer.eos_token_ids)


class JsonObjectProcessor:
    """Logits hook for one request; `max_output` is the request's real token budget."""

    def __init__(self, vocab: JsonVocab, max_output: int):
        self.vocab = vocab
        self.max_output = max_output
        self.state = JsonPrefix()
        self.num_seen = 0
        self.broken = False

    def _advance(self, output_ids: list[int]) -> None:
        for token_id in output_ids[self.num_seen :]:
            text = self.vocab.texts[token_id] if token_id < len(self.vocab.texts) else None
            if not self.state.is_done and (text is None or not self.state.feed_text(text)):
                self.broken = True  # cannot happen with our own mask; stop constraining rather than fail
        self.num_seen = len(output_ids)

    def _fits(self, token_id: int, tokens_left: int) -> bool:
        text = self.vocab.texts[token_id] if token_id < len(self.vocab.texts) else None
        if text is None:
            return False
        trial = self.state.copy()
        return trial.feed_text(text) and trial.chars_to_close() <= tokens_left

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        self._advance(output_ids)
        if self.broken:
            return logits
        if self.state.is_done:
            allowed = self.vocab.eos_ids
        else:
            # After this token, each later token can close at least one character.
            tokens_left = self.max_output - len(output_ids) - 1
            k = min(NUM_CANDIDATES, logits.shape[0])
            candidates = logits.topk(k).indices.tolist()
            allowed = [t for t in candidates if self._fits(t, tokens_left)]
            if not allowed:
                allowed = [t for t in range(min(len(self.vocab.texts), logits.shape[0])) if self._fits(t, tokens_left)]
        if not allowed:
            return logits
        masked = torch.full_like(logits, float("-inf"))
        index = torch.tensor(allowed, device=logits.device)
        masked[index] = logits[index]
        return masked
