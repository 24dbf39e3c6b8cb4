"""The offline Python API: `LLM(model).generate(prompts, params)`."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence as Seq
from typing import Any

import torch

from selfhost.device import pick_device, pick_dtype
from selfhost.engine.config import EngineConfig
from selfhost.engine.kv_stores import kv_cache_type
from selfhost.engine.latent_cache import LatentKVCache
from selfhost.engine.llm_engine import LLMEngine, free_memory_bytes
from selfhost.engine.paged_cache import prompt_tiles_available
from selfhost.errors import InvalidParameterError
from selfhost.hub import resolve_model
from selfhost.models.bf16_weights import uses_bf16_weights
from selfhost.models.loader import load_model
from selfhost.onnx.export_info import is_onnx_export
from selfhost.outputs import RequestOutput
from selfhost.quant.config import QuantConfig
from selfhost.sampling_params import SamplingParams
from selfhost.speculative.config import SpeculativeConfig
from selfhost.tokenizer import Tokenizer

Prompt = str | list[int]
# weight_dtype -> whether linear weights are stored bf16 under fp32 activations.
WEIGHT_DTYPES = {None: False, "float32": False, "fp32": False, "bfloat16": True, "bf16": True, "auto": "auto"}
KV_CACHE_DTYPES = ("auto", "bfloat16", "bf16", "float32", "fp32", "int8")
Message = dict[str, Any]


class LLM:
    """A model loaded for generation.

    `model` is a local folder, a Hugging Face Hub id, a catalog alias, or None
    for the embedded demo model. On CPU the default dtype is float32; on CUDA
    bfloat16 (float16 where bf16 is unsupported). `quantization="int8"|"int4"`
    quantizes the weights right after loading (docs/QUANTIZATION.md).
    `weight_dtype="bfloat16"` keeps an fp32 CPU model's linear weights in bf16
    (half the bytes a decode step reads; AMX/AVX512-BF16 matmuls for prompts and
    batches) while activations and norms stay fp32; "auto" does so only where it
    measures faster on this CPU (the choice is logged, cached per CPU, and shown in
    `engine.stats()`); None or "float32" keeps the weights as loaded (exact parity
    with transformers). `kv_cache_dtype`: "auto" (bf16 under bf16 weights, and under
    quantized ones where prompt attention runs on AMX tiles; else the model's dtype),
    "bfloat16" (half the bytes of keys and values under fp32 activations), "int8" (a
    quarter, plus a scale per token and kv head: not exact, see README's "8-bit KV
    cache") or "float32".
    `transformers_fallback=True` runs architectures selfhost has no native code
    for through transformers' modeling code: same API, much slower.
    A folder written by `selfhost export onnx` runs on ONNX Runtime instead (same
    API, one sequence at a time; its precision is the export's).
    `lora={"legal": "./legal-adapter", ...}` serves LoRA adapters (PEFT folders) on
    this base: `generate(..., lora="legal")`; up to `max_loras` are loaded at once
    (least recently used evicted), each of rank at most `max_lora_rank`; `lora={}` makes the
    slots with no adapter yet (`llm.adapters.add(name, folder)` adds them). `allow_pickle` also
    lets adapters be read from `adapter_model.bin`.
    `speculative="ngram"` (prompt lookup) or `"draft:PATH"` (a smaller model with the same
    tokenizer) turns on speculative decoding: up to `num_speculative_tokens` proposed tokens per
    sequence are verified in one step; outputs are unchanged (greedy: token for token; sampled:
    the same distribution). See `engine.stats()` for the acceptance rate.
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
        kv_cache_memory: str | int | float | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 1024,
        enable_prefix_caching: bool = True,
        quantization: str | None = None,
        transformers_fallback: bool = False,
        weight_dtype: str | None = None,
        kv_cache_dtype: str = "auto",
        lora: dict[str, str] | None = None,
        max_loras: int = 4,
        max_lora_rank: int = 16,
        speculative: str | None = None,
        num_speculative_tokens: int = 4,
    ):
        self.model_dir = resolve_model(model, allow_pickle=allow_pickle, revision=revision)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.tokenizer = Tokenizer(self.model_dir)
        self._request_ids = itertools.count()
        self.driven_by_async_engine = False  # set by AsyncEngine, which then owns `engine`
        if is_onnx_export(self.model_dir):
            if lora or speculative:
                raise InvalidParameterError("LoRA adapters and speculative decoding run on selfhost's own model, "
                                            "not an ONNX export")
            self._init_onnx(device, max_model_len, quantization, weight_dtype, kv_cache_dtype)
            return
        speculative_config = SpeculativeConfig.parse(speculative, num_speculative_tokens)  # fail before the load
        quant_config = QuantConfig(method=quantization) if quantization is not None else None
        if weight_dtype not in WEIGHT_DTYPES:
            raise InvalidParameterError(f"weight_dtype={weight_dtype!r} is not supported; choose None or 'float32' "
                                        "(the weights as loaded), 'bfloat16' or 'auto'")
        pick_kv_cache_dtype(kv_cache_dtype, self.dtype, False)  # refuse a bad value before the load
        # On the fly: loaded, then quantized; `selfhost quantize` writes the same modules to disk.
        self.model = load_model(
            self.model_dir, self.dtype, self.device, max_model_len, allow_pickle, transformers_fallback, quant_config,
            bf16_weights=WEIGHT_DTYPES[weight_dtype],
        )
        self.weight_precision = getattr(self.model, "weight_precision", None)  # set where "auto" chose
        self.adapters = None
        if lora is not None:  # name -> adapter folder, loaded into one of max_loras slots on first use ({}: none yet)
            from selfhost.lora.serving import AdapterSlots

            self.adapters = AdapterSlots(self.model, lora, max_loras, max_lora_rank, allow_pickle=allow_pickle)
        self.kv_cache_dtype = pick_kv_cache_dtype(kv_cache_dtype, self.dtype, narrow_weights(self.model, self.device))
        if self.kv_cache_dtype == torch.int8 and (kv_cache_type(self.model.spec) is LatentKVCache
                                                   or not isinstance(self.model, torch.nn.Module)):
            raise InvalidParameterError("kv_cache_dtype='int8' needs keys and values in selfhost's own paged cache "
                                        "(not latent attention, not the transformers fallback); choose 'auto' or "
                                        "'bfloat16'")
        self.max_model_len = self.model.max_len
        if kv_cache_memory is None:
            # Enough for every sequence at full context, but never more than 30% of free memory.
            per_token = kv_cache_type(self.model.spec).bytes_per_block(self.model.spec, 1, self.kv_cache_dtype)
            full = max_num_seqs * self.max_model_len * per_token
            kv_cache_memory = min(full, int(free_memory_bytes(self.device) * 0.3))
        self.engine_config = EngineConfig(
            kv_cache_memory=kv_cache_memory,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=self.max_model_len,
            enable_prefix_caching=enable_prefix_caching,
        )
        draft_model = None
        if speculative_config is not None and speculative_config.method == "draft":
            draft_model = self._load_draft(speculative_config.draft_model, allow_pickle)
        self.engine = LLMEngine(self.model, self.tokenizer, self.engine_config, self.dtype, self.device,
                                self.kv_cache_dtype, self.adapters, speculative_config, draft_model)

    def _load_draft(self, draft: str, allow_pickle: bool):
        """The draft model for speculative decoding, in the target's dtype, weight precision and device, checked to
        share its tokenizer."""
        from selfhost.tokenizer import check_same_tokenizer

        draft_dir = resolve_model(draft, allow_pickle=allow_pickle)
        draft_model = load_model(draft_dir, self.dtype, self.device, None, allow_pickle,
                                 bf16_weights=uses_bf16_weights(self.model))
        # A proposal is a token id: it means the same text to both models only under one vocabulary.
        check_same_tokenizer(self.tokenizer.hf, Tokenizer(draft_dir).hf, self.model.spec.vocab_size,
                             draft_model.spec.vocab_size, ("the target", f"the draft model {draft}"),
                             "a draft model must share the target's tokenizer")
        return draft_model

    def _init_onnx(self, device: str, max_model_len: int | None, quantization: str | None,
                   weight_dtype: str | None, kv_cache_dtype: str) -> None:
        """A folder from `selfhost export onnx`: ONNX Runtime runs it, one sequence at a time (onnx/engine.py)."""
        if quantization is not None or weight_dtype not in (None, "auto") or kv_cache_dtype != "auto":
            raise InvalidParameterError(f"{self.model_dir} is an ONNX export: its precision was fixed at export "
                                        "(selfhost export onnx --dtype/--quant); drop quantization, weight_dtype "
                                        "and kv_cache_dtype")
        if device not in ("auto", "cpu"):
            raise InvalidParameterError(f"an ONNX export runs on ONNX Runtime's CPU provider here, not device={device!r}")
        self.device = torch.device("cpu")
        from selfhost.onnx.engine import OnnxEngine

        self.engine = OnnxEngine(self.model_dir, self.tokenizer, max_model_len)
        self.model = self.engine.model  # an OnnxDecoder: what `selfhost perplexity` scores with
        self.max_model_len = self.engine.max_model_len
        self.dtype = torch.float16 if self.model.info.dtype == "fp16" else torch.float32
        self.kv_cache_dtype = self.dtype
        self.weight_precision = None
        self.engine_config = None

    def generate(
        self, prompts: Prompt | Seq[Prompt], params: SamplingParams | None = None,
        lora: str | Seq[str | None] | None = None,
    ) -> list[RequestOutput]:
        """One output per prompt; a prompt is a string or a list of token ids.

        `lora`: the adapter (a name given to `LLM(lora=...)`) for every prompt, or one per prompt;
        None is the base model. Prompts for different adapters run in the same batch."""
        self._check_not_driven()
        params = params or SamplingParams()
        all_ids = self._normalise(prompts)
        loras = [lora] * len(all_ids) if lora is None or isinstance(lora, str) else list(lora)
        if len(loras) != len(all_ids):
            raise InvalidParameterError(f"{len(loras)} adapters given for {len(all_ids)} prompts", param="lora")
        seqs = []
        try:
            for ids, name in zip(all_ids, loras):
                seqs.append(self.engine.add_request(self._next_id(), ids, params, lora=name))
            while any(not s.is_finished for s in seqs):
                self.engine.step()
        finally:
            for seq in seqs:  # an interrupted call must not leave blocks behind
                if not seq.is_finished:
                    self.engine.abort(seq.request_id)
        return [seq.to_output() for seq in seqs]

    def chat(
        self, messages: list[Message] | list[list[Message]], params: SamplingParams | None = None,
        lora: str | Seq[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([self.tokenizer.encode_chat(c) for c in conversations], params, lora)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, lora: str | None = None) -> Iterator[str]:
        """Yield text as it is generated for one prompt (stop strings never leak)."""
        self._check_not_driven()
        seq = self.engine.add_request(self._next_id(), self._normalise(prompt)[0], params or SamplingParams(),
                                      lora=lora)
        try:
            while not seq.is_finished:
                if seq in self.engine.step():
                    delta = seq.take_delta()
                    if delta:
                        yield delta
        finally:
            if not seq.is_finished:
                self.engine.abort(seq.request_id)

    def _normalise(self, prompts: Prompt | Seq[Prompt]) -> list[list[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        elif prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        return [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]

    def _check_not_driven(self) -> None:
        # The engine is single-threaded: two drivers would step it concurrently.
        if self.driven_by_async_engine:
            raise InvalidParameterError("this LLM is driven by an AsyncEngine; call AsyncEngine.generate instead")

    def _next_id(self) -> str:
        return f"llm-{next(self._request_ids)}"


def narrow_weights(model, device: torch.device) -> bool:
    """Whether "auto" gives the KV cache bf16: under bf16 weights, and under quantized ones where prompt
    attention over a bf16 cache runs on AMX tiles (a 1024-token int8 prompt: 321 -> 173 ms on a 2-core
    Xeon, the fp32 cache's AVX-512 attention ~4x slower than the tiles); the weights' own rounding
    already dwarfs the cache's."""
    if uses_bf16_weights(model):
        return True
    return getattr(model, "quant_config", None) is not None and device.type == "cpu" and prompt_tiles_available()


def pick_kv_cache_dtype(requested: str, dtype: torch.dtype, bf16_weights: bool) -> torch.dtype:
    """What the KV cache stores: "auto" follows the weights (bf16 under narrow weights, see
    `narrow_weights`), else the model's dtype."""
    if requested not in KV_CACHE_DTYPES:
        raise InvalidParameterError(f"kv_cache_dtype={requested!r} is not supported; choose one of "
                                    "'auto', 'bfloat16', 'float32', 'int8'")
    if requested == "int8":
        return torch.int8
    if requested in ("bfloat16", "bf16") or (requested == "auto" and bf16_weights):
        if dtype not in (torch.float32, torch.bfloat16):
            raise InvalidParameterError(f"kv_cache_dtype='bfloat16' needs float32 or bfloat16 activations, not {dtype}")
        return torch.bfloat16
    if requested in ("float32", "fp32") and dtype != torch.float32:
        raise InvalidParameterError(f"kv_cache_dtype='float32' needs dtype='float32' (the model runs in {dtype})")
    return dtype
