"""ModelRegistry: which models the server holds, loading, keep-alive and the memory budget.

Models named at start-up are preloaded and stay. With `allow_load`, any other
reference (folder, Hub id, catalog alias) loads on its first request and is
unloaded after `keep_alive_s` without requests. A load that would push weights +
KV caches over `memory_budget` first unloads idle on-demand models, and if that
is not enough fails with a 507 naming the figures; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from selfhost.errors import SelfhostError
from selfhost.hub import EMBEDDED_MODEL_NAME
from selfhost.server.errors import APIError, ModelMemoryError
from selfhost.server.settings import ServerSettings
from selfhost.tools.model_tools import ModelTools

log = logging.getLogger("selfhost.server")

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def split_model_arg(arg: str | None) -> tuple[str, str | None]:
    """'NAME=REF' -> (NAME, REF); 'REF' -> (REF, REF); None -> the demo model."""
    if arg is None or arg in ("default", EMBEDDED_MODEL_NAME):
        return EMBEDDED_MODEL_NAME, None
    if "=" in arg:
        name, ref = arg.split("=", 1)
        return name, ref
    return arg, arg


def canonical(name: str) -> str:
    # Ollama clients add ':latest' to bare names.
    return name.removesuffix(":latest")


@dataclass
class ServedModel:
    name: str
    ref: str | None
    llm: object  # selfhost.LLM
    engine: object  # selfhost.AsyncEngine
    pinned: bool
    weight_bytes: int
    kv_cache_bytes: int
    keep_alive_s: float
    num_params: int  # as the architecture defines them; packed int4 storage holds two per element
    quantization: str | None  # `selfhost quantize` method from the folder's config.json; None: full precision
    lora: str | None = None  # an adapter on another entry's engine (`--lora NAME=FOLDER`); None: the model itself
    parent: str | None = None  # an adapter's base model (the entry whose engine it runs on)
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    active: int = 0
    _tools: ModelTools | None = None

    @property
    def tools(self) -> ModelTools:
        """The model's tool-call format, made on the first request that needs it."""
        if self._tools is None:
            self._tools = ModelTools(self.llm.tokenizer)
        return self._tools

    @property
    def memory_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes

    @property
    def expires_at(self) -> float | None:
        """Wall-clock time of the keep-alive unload; None for pinned models."""
        if self.pinned or self.keep_alive_s < 0:
            return None
        return time.time() + self.keep_alive_s - (time.monotonic() - self.last_used)

    def is_idle_for(self, seconds: float) -> bool:
        return self.active == 0 and time.monotonic() - self.last_used >= seconds

    def begin(self) -> None:
        self.active += 1
        self.last_used = time.monotonic()

    def end(self) -> None:
        self.active -= 1
        self.last_used = time.monotonic()


class ModelRegistry:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.models: dict[str, ServedModel] = {}
        self._load_lock = asyncio.Lock()
        self._reaper: asyncio.Task | None = None
        self._preloaded = False

    # -- lookup ---------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self.models)

    def default_name(self) -> str | None:
        return next(iter(self.models), None)

    async def get(self, name: str) -> ServedModel:
        """The model called `name`, loading it first when the server allows that."""
        name = canonical(name)
        served = self.models.get(name)
        if served is not None:
            return served
        if not self.settings.allow_load:
            available = ", ".join(self.models) or "none"
            raise APIError(
                f"model {name!r} is not loaded (loaded: {available}); start the server with --allow-load "
                "to load models on request",
                404, param="model", code="model_not_found",
            )
        if is_adapter_folder(name):  # a LoRA adapter: onto the base that serves adapters, not a model of its own
            return await self.add_adapter(name, name, exist_ok=True)
        async with self._load_lock:  # one load at a time keeps the budget arithmetic honest
            if name not in self.models:
                await self._load(name, name, pinned=False)
        return self.models[name]

    # -- loading ----------------------------------------------------------------

    async def preload(self) -> None:
        """Load the start-up models; a no-op once done (the CLI preloads before the app's lifespan runs)."""
        if self._preloaded:
            return
        # With a gateway config, no model named means none: its models may all be remote.
        loras = self._lora_folders()
        for arg in self.settings.models or ([] if self.settings.config else [None]):
            name, ref = split_model_arg(arg)
            await self._load(name, ref, pinned=True, loras=loras)
            loras = {}  # adapters belong to the first model
        if loras:
            raise APIError("--lora needs a preloaded model to serve the adapters on", 400, param="lora")
        self._preloaded = True

    def _lora_folders(self) -> dict[str, str]:
        loras = {}
        for arg in self.settings.lora:
            name, sep, folder = arg.partition("=")
            if not sep or not name or not folder:
                raise APIError(f"--lora {arg!r} must be NAME=FOLDER", 400, param="lora")
            loras[name] = folder
        return loras

    async def _load(self, name: str, ref: str | None, pinned: bool, loras: dict[str, str] | None = None) -> None:
        from selfhost.hub import resolve_model

        model_dir = await asyncio.to_thread(resolve_model, ref)
        self._make_room(self._estimate_weight_bytes(model_dir), name)
        log.info("loading model %s from %s", name, model_dir)
        start = time.perf_counter()
        served = await asyncio.to_thread(self._build, name, ref, str(model_dir), pinned, loras or {})
        if getattr(served.llm, "adapters", None) is not None:  # an ONNX export's LLM has no slots at all
            served.llm.adapters.allow_pickle = self.settings.lora_allow_pickle
            try:  # every --lora folder is read and checked against this base now, not on its first request
                for adapter, folder in (loras or {}).items():
                    await asyncio.to_thread(served.llm.adapters.prefetch, adapter)
            except SelfhostError as err:
                await asyncio.to_thread(self._release, served)
                raise APIError(f"--lora {adapter}={folder}: {err}", 400, param="lora", code="invalid_adapter") from err
        budget = self.settings.memory_budget_bytes
        if budget is not None and self.used_bytes() + served.memory_bytes > budget:
            await asyncio.to_thread(self._release, served)
            raise ModelMemoryError(
                f"model {name!r} needs {_gib(served.memory_bytes)} (weights {_gib(served.weight_bytes)} + KV cache "
                f"{_gib(served.kv_cache_bytes)}); {_gib(self.used_bytes())} of the {_gib(budget)} budget is in use"
            )
        self.models[name] = served
        log.info("loaded %s in %.1fs: %s weights, %d KV tokens", name, time.perf_counter() - start,
                 _gib(served.weight_bytes), served.llm.engine.capacity_tokens)
        for adapter, folder in (loras or {}).items():
            self._add_adapter_entry(served, adapter, folder, adapter)

    def _add_adapter_entry(self, base: ServedModel, name: str, folder: str, key: str) -> ServedModel:
        """The base's engine under the adapter's name; its memory is the base's."""
        entry = dataclasses.replace(base, name=name, ref=folder, weight_bytes=0, kv_cache_bytes=0, pinned=True,
                                    lora=key, parent=base.name, active=0, loaded_at=time.time())
        self.models[name] = entry
        return entry

    # -- adapters added and removed while serving ------------------------------

    def adapter_base(self) -> ServedModel:
        """The model whose engine serves LoRA adapters."""
        served = next((m for m in self.models.values()
                       if m.lora is None and getattr(m.llm, "adapters", None) is not None), None)
        if served is None:
            raise APIError("no model here serves LoRA adapters: start the server with --lora NAME=FOLDER, which "
                           "gives the first preloaded model adapter slots", 400, param="model",
                           code="adapters_not_enabled")
        return served

    async def add_adapter(self, name: str, folder: str, exist_ok: bool = False) -> ServedModel:
        """Read and check the adapter in `folder` (off the event loop) and serve it as model `name`."""
        if not self.settings.allow_load:
            raise APIError("loading adapters while serving is off; start the server with --allow-load", 403,
                           code="loading_disabled")
        async with self._load_lock:
            if name in self.models:
                if exist_ok and self.models[name].lora is not None:
                    return self.models[name]
                raise APIError(f"a model or adapter named {name!r} is already loaded", 409, param="lora_name",
                               code="adapter_exists")
            base = self.adapter_base()
            key, info = await asyncio.to_thread(base.llm.adapters.add, name, Path(folder))
            log.info("adapter %s loaded from %s on %s: rank %d, %s", name, folder, base.name, info.rank,
                     ", ".join(info.target_modules))
            return self._add_adapter_entry(base, name, folder, key)

    def remove_adapter(self, name: str) -> None:
        """Stop serving adapter `name`; requests already running finish with it."""
        if not self.settings.allow_load:
            raise APIError("unloading adapters while serving is off; start the server with --allow-load", 403,
                           code="loading_disabled")
        served = self.models.get(canonical(name))
        if served is None or served.lora is None:
            adapters = ", ".join(m.name for m in self.models.values() if m.lora is not None) or "none"
            raise APIError(f"no adapter named {name!r} is loaded (adapters: {adapters})", 404, param="lora_name",
                           code="adapter_not_found")
        del self.models[served.name]
        served.llm.adapters.remove(served.lora)
        log.info("adapter %s unloaded", served.name)

    def _build(self, name: str, ref: str | None, model_dir: str, pinned: bool, loras: dict[str, str]) -> ServedModel:
        from selfhost import LLM, AsyncEngine
        from selfhost.engine.paged_cache import PagedKVCache

        s = self.settings
        llm = LLM(model_dir, dtype=s.dtype, device=s.device, max_model_len=s.max_model_len,
                  kv_cache_memory=s.kv_cache_memory, max_num_seqs=s.max_num_seqs,
                  transformers_fallback=s.transformers_fallback, weight_dtype=s.weight_dtype,
                  kv_cache_dtype=s.kv_cache_dtype, lora=loras or None, max_loras=s.max_loras,
                  max_lora_rank=s.max_lora_rank, speculative=s.speculative,
                  num_speculative_tokens=s.num_speculative_tokens)
        weight_bytes = sum(t.numel() * t.element_size() for t in llm.model.parameters())
        weight_bytes += sum(t.numel() * t.element_size() for t in llm.model.buffers())
        per_block = PagedKVCache.bytes_per_block(llm.model.spec, llm.engine_config.block_size, llm.kv_cache_dtype)
        kv_bytes = llm.engine.block_manager.num_blocks * per_block
        return ServedModel(name, ref, llm, AsyncEngine(llm), pinned, weight_bytes, kv_bytes, s.keep_alive_s,
                           count_parameters(llm.model), _quantization(Path(model_dir)))

    def _estimate_weight_bytes(self, model_dir: Path) -> int:
        """Weights on disk, scaled to the dtype they will be loaded in (a lower bound before loading)."""
        files = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
        try:
            config = json.loads((model_dir / "config.json").read_text())
        except (OSError, ValueError):
            return files
        stored = _DTYPE_BYTES.get(config.get("torch_dtype") or config.get("dtype") or "", 0)
        target = _DTYPE_BYTES.get(self.settings.dtype, 4 if self.settings.device in ("auto", "cpu") else 2)
        return files * target // stored if stored else files

    def used_bytes(self) -> int:
        return sum(m.memory_bytes for m in self.models.values())

    def _make_room(self, needed_bytes: int, name: str) -> None:
        budget = self.settings.memory_budget_bytes
        if budget is None:
            return
        idle = sorted((m for m in self.models.values() if not m.pinned and m.active == 0), key=lambda m: m.last_used)
        while idle and self.used_bytes() + needed_bytes > budget:
            self.unload(idle.pop(0).name)
        if self.used_bytes() + needed_bytes > budget:
            raise ModelMemoryError(
                f"model {name!r} needs at least {_gib(needed_bytes)} for its weights; {_gib(self.used_bytes())} of "
                f"the {_gib(budget)} memory budget is held by models in use (raise --memory-budget)"
            )

    # -- unloading ------------------------------------------------------------

    def unload(self, name: str) -> None:
        served = self.models.pop(name, None)
        if served is not None and served.lora is None:  # an adapter's engine is its base model's
            log.info("unloading model %s", name)
            self._release(served)

    @staticmethod
    def _release(served: ServedModel) -> None:
        served.engine.shutdown()
        device = served.llm.device
        served.llm = served.engine = None
        gc.collect()
        if getattr(device, "type", None) == "cuda":
            import torch

            torch.cuda.empty_cache()

    async def _reap_idle(self) -> None:
        interval = max(0.2, min(5.0, self.settings.keep_alive_s / 4))
        while True:
            await asyncio.sleep(interval)
            for served in list(self.models.values()):
                if not served.pinned and served.keep_alive_s >= 0 and served.is_idle_for(served.keep_alive_s):
                    # Popped on the loop, so no request can pick it up between the check and the unload.
                    del self.models[served.name]
                    log.info("unloading model %s (idle for %.0fs)", served.name, served.keep_alive_s)
                    await asyncio.to_thread(self._release, served)

    def start_reaper(self) -> None:
        self._reaper = asyncio.get_running_loop().create_task(self._reap_idle())

    async def shutdown(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for name in list(self.models):
            await asyncio.to_thread(self.unload, name)


def is_adapter_folder(ref: str) -> bool:
    """A folder holding a PEFT adapter (adapter_config.json) rather than a model."""
    from selfhost.lora.adapter_format import CONFIG_FILE

    return (Path(ref) / CONFIG_FILE).is_file()


def count_parameters(model) -> int:
    """Parameters of `model` as its spec defines them, not as stored: a quantized layer's packed
    tensors hold fewer elements (two int4 values per byte) plus scales and zero points."""
    import torch

    from selfhost.models.decoder import CausalLM
    from selfhost.models.spec import ModelSpec

    if not isinstance(model.spec, ModelSpec):  # the transformers fallback: its own modules, never quantized
        return sum(p.numel() for p in model.parameters())
    with torch.device("meta"):  # shapes only, no memory
        reference = CausalLM(model.spec, max_len=1)
    reference.tie_weights()
    return sum(p.numel() for p in reference.parameters())  # a tied table counts once


def _quantization(model_dir: Path) -> str | None:
    from selfhost.models.loader import is_dequantized_at_load, read_config
    from selfhost.quant.config import QuantConfig

    quantization = read_config(model_dir).get("quantization_config")
    if quantization is None or is_dequantized_at_load(quantization):  # FP8/MXFP4 releases load in full precision
        return None
    return QuantConfig.from_json(quantization).method


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB"
