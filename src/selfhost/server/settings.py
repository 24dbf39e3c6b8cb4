"""ServerSettings: every `selfhost serve` option, written once.

Each field is an environment variable (`SELFHOST_PORT=9000`, `SELFHOST_API_KEY=...`)
and a CLI flag (`--port 9000`); cli/serve.py generates the flags from these fields,
so defaults and help texts live only here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from selfhost.engine.config import parse_memory
from selfhost.server.responses_store import Retention
from selfhost.units import parse_size

# Lists come from the environment as 'a,b' (not JSON) and from the CLI as repeated flags.
StrList = Annotated[list[str], NoDecode]


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SELFHOST_", extra="ignore")

    models: StrList = Field(
        default_factory=list,
        description="Models to preload: folder, Hub id or alias, optionally NAME=REF. None: the embedded demo model.",
    )
    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 for every interface).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port).")
    allow_load: bool = Field(
        False, description="Load models that were not preloaded on their first request; also LoRA adapters: a request "
        "naming an adapter folder, and POST /v1/load_lora_adapter and /v1/unload_lora_adapter.",
    )
    lora: StrList = Field(
        default_factory=list,
        description="Serve a LoRA adapter (a PEFT folder) on the first preloaded model as NAME=FOLDER; requests name "
        "it as their model (repeatable).",
    )
    max_loras: int = Field(4, ge=1, description="Adapters held in memory at once (least recently used evicted).")
    max_lora_rank: int = Field(16, ge=1, description="Largest adapter rank served (larger ones are refused).")
    lora_allow_pickle: bool = Field(
        False, description="Accept adapters whose weights are adapter_model.bin (a pickle, which can run code when "
        "read); otherwise only adapter_model.safetensors.",
    )
    api_key: StrList = Field(
        default_factory=list, description="Require this bearer key on /v1 and /api (repeatable; env: comma list)."
    )
    cors: StrList = Field(default_factory=list, description="Allow browser requests from this origin (or '*').")
    kv_cache_memory: str | None = Field(
        None, description="KV cache per model: a size like '2GiB', or a bare number in (0, 1] for that share of "
        "free memory, like '0.3'."
    )
    max_num_seqs: int = Field(64, ge=1, description="Most requests batched at once per model.")
    max_model_len: int | None = Field(None, ge=16, description="Cap the context window (default: the model's).")
    dtype: str = Field("auto", description="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16.")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N.")
    weight_dtype: str = Field(
        "auto", description="auto (bf16 linear weights where that measures faster on this CPU), bfloat16, or "
        "float32 (the weights as loaded: exact parity with transformers)."
    )
    kv_cache_dtype: str = Field("auto", description="auto (bf16 under bf16 weights, and under quantized ones on CPUs with AMX; else the model's dtype), "
                                "bfloat16, float32, int8 (a scale per token and head; not exact).")
    transformers_fallback: bool = Field(
        False, description="Run architectures without native support through transformers (slower)."
    )
    speculative: str | None = Field(
        None, description="Speculative decoding for every model served: 'ngram' (prompt lookup) or 'draft:PATH' (a "
        "smaller model with the same tokenizer). Outputs are unchanged; single streams get faster.",
    )
    num_speculative_tokens: int = Field(4, ge=1, description="Most tokens proposed per sequence and step.")
    memory_budget: str | None = Field(
        None, description="Total memory for all loaded models (weights + KV), e.g. '12GiB'; over it a load fails."
    )
    keep_alive_s: float = Field(300.0, ge=0, description="Unload an on-demand model idle this long (preloaded stay).")
    max_n: int = Field(8, ge=1, description="Largest `n` (choices per request) accepted.")
    log_level: str = Field("info", description="Log level: debug, info, warning, error.")
    embedding_model: StrList = Field(
        default_factory=lambda: ["all-MiniLM-L6-v2"],
        description="Embedding model served at /v1/embeddings, loaded on first use: sentence-transformers / HF id "
        "or folder, optionally NAME=REF (repeatable; default: the bundled all-MiniLM-L6-v2).",
    )
    rag_store: Path | None = Field(
        None, description="Folder of the embedded vector database that chat requests naming a collection search "
        "(default: $SELFHOST_RAG_DIR or ~/.local/share/selfhost/rag, as for `selfhost rag`).",
    )
    vector_url: str | None = Field(None, description="A Qdrant server URL instead of the embedded vector database.")
    prefix_cache_scope: Literal["global", "key"] = Field(
        "global", description="Share cached prompt prefixes between all requests (global), or only between requests "
        "made with the same API key (key): one tenant's requests then cannot tell whether another's prompt is cached.",
    )
    max_body_bytes: str = Field("16MiB", description="Largest request body accepted (413 above it), e.g. '16MiB'.")
    max_headers: int = Field(100, ge=1, description="Most request headers accepted (431 above).")
    max_header_bytes: int = Field(65536, ge=1024, description="Largest total size of a request's headers (431 above).")
    responses_db: Path | None = Field(
        None, description="SQLite file where /v1/responses keeps stored responses for previous_response_id "
        "(default: ~/.local/share/selfhost/responses.db).",
    )
    config: Path | None = Field(
        None, description="A gateway config (TOML): [[models]] entries, local (`path`) or remote OpenAI-compatible "
        "(`url`, `model`, `api_key_env`), with deployments, fallbacks and a cost ledger (see README: Gateway).",
    )
    responses_retention: str = Field(
        "10000", description="How many stored responses to keep: a count ('10000'), or an age ('30d', '12h', '90m').",
    )

    @field_validator("models", "api_key", "cors", "embedding_model", "lora", mode="before")
    @classmethod
    def _split_commas(cls, value):
        # Env vars arrive as one string: SELFHOST_API_KEY=k1,k2
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @property
    def max_body_bytes_value(self) -> int:
        return parse_size(self.max_body_bytes, what="max_body_bytes")

    @field_validator("max_body_bytes")
    @classmethod
    def _check_body_limit(cls, value):
        parse_size(value, what="max_body_bytes")  # raises InvalidParameterError naming the value
        return value

    @field_validator("kv_cache_memory")
    @classmethod
    def _check_kv_cache_memory(cls, value):
        if value is not None:
            parse_memory(value)  # raises InvalidParameterError naming the value
        return value

    @field_validator("memory_budget")
    @classmethod
    def _check_memory_budget(cls, value):
        if value is not None:
            parse_size(value, what="memory_budget")  # a size only: a total, not a share of what is free
        return value

    @field_validator("responses_retention")
    @classmethod
    def _check_responses_retention(cls, value):
        Retention.parse(value)  # raises InvalidParameterError naming the value
        return value

    @property
    def responses_db_path(self) -> Path:
        return self.responses_db or Path.home() / ".local" / "share" / "selfhost" / "responses.db"

    @property
    def memory_budget_bytes(self) -> int | None:
        return None if self.memory_budget is None else parse_size(self.memory_budget, what="memory_budget")
