"""Constrained decoding on llguidance: grammars compiled once, token masks for a whole batch.

Why llguidance (measured 2026-12-06, Intel Xeon VM with AVX-512/AMX, 2 cores, a
32k byte-level BPE vocabulary, a nested schema with pattern/enum/anyOf/bounds):
compiling a schema took 1.5 ms against xgrammar 0.2.9's 13 ms; filling the masks
of 32 rows took 1.6 ms a step against xgrammar's 0.43 ms, which is ~2% of a
32-row CPU decode step; in random-walk decoding of eight schemas xgrammar let a
raw control character into a JSON string (invalid JSON) and llguidance produced
no invalid document; and llguidance installs with no dependencies, where xgrammar
pulls triton and a TVM runtime. `benchmarks/structured.py` measures the cost in
the engine.

A `GrammarCompiler` belongs to one engine (one tokenizer). It builds llguidance's
view of the vocabulary on first use (~0.3 s for 32k tokens), keeps one pristine
matcher per distinct constraint (LRU) and hands each request a deep copy, so a
repeated schema costs microseconds. Masks and token updates for all constrained
rows of a step go through one `LLExecutor` call each, in Rust threads, with no
per-row Python work beyond listing the rows.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import llguidance
import llguidance.hf
import torch

from selfhost.errors import InvalidParameterError
from selfhost.layers.sampler import TokenMasks
from selfhost.structured_output import StructuredOutput
from selfhost.tokenizer import Tokenizer

# Distinct constraints whose compiled form is kept (each a few hundred KB at most).
CACHED_GRAMMARS = 256
# Up to this many constrained rows a step, masks and updates run on the engine thread: handing
# them to the executor's threads costs more than it saves, and those threads would then compete
# with the forward pass's for the cores.
SERIAL_ROWS = 2


class GrammarCompiler:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: frozenset[int]):
        self._tokenizer, self._vocab_size, self._eos = tokenizer, vocab_size, sorted(eos_token_ids)
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._executor = llguidance.LLExecutor()
        # Servers compile on request threads while the engine thread uses the cache.
        self._lock = threading.Lock()

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self._tokenizer.hf, n_vocab=self._vocab_size, eos_token=self._eos or None)
            return self._ll_tokenizer

    def matcher(self, constraint: StructuredOutput) -> llguidance.LLMatcher:
        """A fresh matcher at the start of `constraint`; a bad grammar is an InvalidParameterError."""
        key = constraint.key
        with self._lock:
            pristine = self._compiled.get(key)
            if pristine is not None:
                self._compiled.move_to_end(key)
                return pristine.deep_copy()
        pristine = llguidance.LLMatcher(self.ll_tokenizer, constraint.llguidance_grammar(), log_level=0)
        if pristine.is_error():
            raise InvalidParameterError(f"the output constraint does not compile: {pristine.get_error()}",
                                        param="structured_output")
        with self._lock:
            self._compiled[key] = pristine
            while len(self._compiled) > CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return pristine.deep_copy()

    def fill_masks(self, matchers: list[llguidance.LLMatcher]) -> torch.Tensor:
        """(len(matchers), words) int32 bitmasks of the tokens each matcher allows next.

        Written straight into a tensor by the executor's threads (llguidance.torch would do the
        same, but importing it pulls in torch's compiler stack: +1.8 s and ~140 MB per process).
        """
        words = -(-self.ll_tokenizer.vocab_size // 32)
        masks = torch.full((len(matchers), words), -1, dtype=torch.int32)
        if len(matchers) <= SERIAL_ROWS:
            for i, matcher in enumerate(matchers):
                matcher.unsafe_compute_mask_ptr(masks[i].data_ptr(), words * 4)
        else:
            self._executor.unsafe_compute_mask_ptr(list(zip(matchers, range(len(matchers)))), masks.data_ptr(),
                                                   words * 4, len(matchers))
        return masks

    def step_masks(self, matchers: list[llguidance.LLMatcher | None]) -> TokenMasks | None:
        """The masks of one step's rows (None where a row is unconstrained); None if no row is."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        return TokenMasks(rows, self.fill_masks([matchers[i] for i in rows]))

    def advance(self, matchers: list[llguidance.LLMatcher], token_ids: list[int]) -> None:
        """Feed each matcher its row's sampled token."""
        if len(matchers) <= SERIAL_ROWS:
            for matcher, token_id in zip(matchers, token_ids):
                matcher.consume_token(token_id)
        else:
            self._executor.consume_token_par(list(zip(matchers, token_ids)))
