"""The offline Python API: `LLM(model).generate(prompts, params)`."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence as Seq
from typing import Any

from selfhost.device import pick_device, pick_dtype
from selfhost.engine.sequence import Sequence
from selfhost.engine.single_stream import SingleStreamEngine
from selfhost.errors import InvalidParameterError
from selfhost.hub import resolve_model
from selfhost.models.loader import load_model
from selfhost.outputs import RequestOutput
from selfhost.sampling_params import SamplingParams
from selfhost.tokenizer import Tokenizer

Prompt = str | list[int]
Message = dict[str, Any]


class LLM:
    """A model loaded for generation.

    `model` is a local folder, a Hugging Face Hub id, a catalog alias, or None
    for the embedded demo model. On CPU the default dtype is float32; on CUDA
    bfloat16 (float16 where bf16 is unsupported).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        device: str = "auto",
        max_model_len: int | None = None,
        allow_pickle: bool = False,
        revision: str | None = None,
    ):
        self.model_dir = resolve_model(model, allow_pickle=allow_pickle, revision=revision)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.tokenizer = Tokenizer(self.model_dir)
        self.model = load_model(self.model_dir, self.dtype, self.device, max_model_len, allow_pickle)
        self.max_model_len = self.model.max_len
        self._engine = SingleStreamEngine(self.model, self.device, self.dtype)
        self._request_ids = itertools.count()

    def generate(
        self, prompts: Prompt | Seq[Prompt], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        """One output per prompt; a prompt is a string or a list of token ids."""
        params = params or SamplingParams()
        outputs = []
        for prompt_ids in self._normalise(prompts):
            seq = self._sequence(prompt_ids, params)
            for _ in self._engine.stream(seq):
                pass
            outputs.append(seq.to_output())
        return outputs

    def chat(
        self, messages: list[Message] | list[list[Message]], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([self.tokenizer.encode_chat(c) for c in conversations], params)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text as it is generated for one prompt (stop strings never leak)."""
        seq = self._sequence(self._normalise(prompt)[0], params or SamplingParams())
        for _ in self._engine.stream(seq):
            delta = seq.take_delta()
            if delta:
                yield delta

    def _normalise(self, prompts: Prompt | Seq[Prompt]) -> list[list[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        elif prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        return [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]

    def _sequence(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        if not prompt_ids:
            raise InvalidParameterError("prompt is empty: it must contain at least one token")
        if len(prompt_ids) >= self.max_model_len:
            raise InvalidParameterError(
                f"prompt has {len(prompt_ids)} tokens; this model's context holds {self.max_model_len}"
            )
        vocab = self.model.spec.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidParameterError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        return Sequence(str(next(self._request_ids)), prompt_ids, params, self.tokenizer, self.max_model_len)
