"""The gateway's configuration file (`selfhost serve --config selfhost.toml`), validated at start-up.

    [gateway]                       # optional; every field has a default
    timeout_s = 60
    cooldown_s = 30

    [[models]]                      # a local model, served by selfhost's engine
    name = "qwen"
    path = "Qwen/Qwen2.5-0.5B-Instruct"
    [models.cost]                   # optional: its tokens priced as `selfhost cost` prices them
    device = "rtx4090"

    [[models]]                      # a remote OpenAI-compatible deployment
    name = "gpt"
    url = "https://api.openai.com/v1"
    model = "gpt-4o-mini"
    api_key_env = "OPENAI_API_KEY"
    fallbacks = ["qwen"]

Entries that share a `name` are deployments of one model. Every mistake (an unknown
key or backend type, an unset key variable, a fallback naming no model) is one
`GatewayConfigError` naming the entry, raised before anything is served.
"""

from __future__ import annotations

import os
import tomllib
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from selfhost.errors import SelfhostError

BACKEND_TYPES = ("local", "openai")


class GatewayConfigError(SelfhostError):
    """A gateway configuration that cannot be served as written."""


class LocalCost(BaseModel):
    """`[models.cost]` of a local model: its tokens priced as `selfhost cost` prices them.

    The device's cost is a catalog device's purchase price amortised plus power, or its rent (each
    overridable; without `device`, a price or rent and `throughput_tok_s` are needed). Its speed is
    `throughput_tok_s` (measured, every token alike), a benchmark result file (`bench_result`: measured
    decode and prefill), or else `selfhost fit`'s estimate for the model on the device."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str | None = None  # a catalog id (an unknown one is an error naming the nearest) or "local" (measured)
    quant: str | None = None  # the precision fit plans with; default: fp32 on a CPU, fp16/bf16 on an accelerator
    context: int | None = Field(None, ge=1)
    concurrency: int = Field(8, ge=1)
    throughput_tok_s: float | None = Field(None, gt=0)
    bench_result: str | None = None
    price_usd: float | None = Field(None, ge=0)
    rent_usd_per_hour: float | None = Field(None, ge=0)
    power_w: float | None = Field(None, ge=0)
    amortisation_years: float = Field(3.0, gt=0)
    electricity_usd_per_kwh: float = Field(0.15, ge=0)

    @model_validator(mode="after")
    def _enough(self) -> LocalCost:
        if self.throughput_tok_s is not None and self.bench_result is not None:
            raise ValueError("give `throughput_tok_s` or `bench_result`, not both")
        if self.price_usd is not None and self.rent_usd_per_hour is not None:
            raise ValueError("give `price_usd` (bought) or `rent_usd_per_hour` (rented), not both")
        if self.device is None and (self.throughput_tok_s is None
                                    or (self.price_usd is None and self.rent_usd_per_hour is None)):
            raise ValueError("without `device`, the cost needs `throughput_tok_s` and `price_usd` or "
                             "`rent_usd_per_hour`")
        return self


class ModelEntry(BaseModel):
    """One `[[models]]` entry: a local model or one remote deployment of a public model name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    type: str | None = None  # "local" or "openai"; inferred from `path` / `url` when left out
    path: str | None = None
    url: str | None = None
    model: str | None = None  # the upstream's own id for the model
    api_key_env: str | None = None
    deployment: str | None = None  # the id `x-selfhost-backend` names; default NAME/INDEX
    price_model: str | None = None  # the price catalog id, when it differs from `model`
    weight: float = Field(1.0, gt=0)
    max_concurrency: int | None = Field(None, ge=1)
    fallbacks: tuple[str, ...] = ()
    cost: LocalCost | None = None  # a local model's cost model; without it its answers are unpriced

    @model_validator(mode="after")
    def _one_backend(self) -> ModelEntry:
        kind = self.type or ("local" if self.path is not None else "openai" if self.url is not None else None)
        if kind is None:
            raise ValueError("needs either `path` (a local model) or `url` (a remote OpenAI-compatible server)")
        if kind not in BACKEND_TYPES:
            raise ValueError(f"unknown backend type {kind!r}; expected one of {', '.join(BACKEND_TYPES)}")
        if self.path is not None and self.url is not None:
            raise ValueError("has both `path` and `url`; a local model takes `path`, a remote one `url`")
        if kind == "local" and self.path is None:
            raise ValueError("type 'local' needs `path`")
        if kind != "local" and self.cost is not None:
            raise ValueError("`cost` prices local models; a remote one is priced from the catalog (`price_model`)")
        if kind == "openai":
            if self.url is None or self.model is None:
                raise ValueError("a remote model needs `url` and `model` (the upstream's id for it)")
            if not self.url.startswith(("http://", "https://")):
                raise ValueError(f"url {self.url!r} must start with http:// or https://")
        object.__setattr__(self, "type", kind)  # frozen: fill in the inferred type once
        return self

    @property
    def is_local(self) -> bool:
        return self.type == "local"


class GatewaySettings(BaseModel):
    """`[gateway]`: timeouts, retries, health and the ledger."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout_s: float = Field(60.0, gt=0, description="Longest wait for an upstream's headers or next chunk.")
    connect_timeout_s: float = Field(5.0, gt=0)
    max_attempts: int = Field(4, ge=1, description="Deployments tried per request, fallbacks included.")
    backoff_s: float = Field(0.05, ge=0, description="Pause before the second attempt, doubled after each.")
    cooldown_s: float = Field(30.0, ge=0, description="How long a failing deployment is skipped.")
    health_check_interval_s: float | None = Field(
        15.0, gt=0, description="Probe every deployment's GET /models this often (none: only failed requests count).")
    ledger: str | None = Field(None, description="SQLAlchemy URL of the ledger (default: a SQLite file).")
    router: Literal["least_outstanding", "cheapest"] = Field(
        "least_outstanding", description="How a name's deployments are ordered: fewest outstanding requests per "
        "weight, or the cheapest whose recent median time to first byte meets latency_objective_ms.")
    latency_objective_ms: float = Field(2000.0, gt=0)
    require_key: bool = Field(False, description="Every API request needs a virtual key (selfhost keys create).")


class GatewayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    gateway: GatewaySettings = GatewaySettings()
    models: tuple[ModelEntry, ...] = ()

    @property
    def local_entries(self) -> tuple[ModelEntry, ...]:
        return tuple(e for e in self.models if e.is_local)

    @property
    def remote_entries(self) -> tuple[ModelEntry, ...]:
        return tuple(e for e in self.models if not e.is_local)

    def api_key(self, entry: ModelEntry) -> str | None:
        """The upstream key, read from the environment when it is needed (never stored on the config)."""
        return os.environ.get(entry.api_key_env) if entry.api_key_env else None


def check_references(config: GatewayConfig, check_env: bool = True) -> None:
    """What a single entry cannot check: names, fallbacks, key variables, deployment ids."""
    names = {e.name for e in config.models}
    local_names = Counter(e.name for e in config.local_entries)
    for name, count in local_names.items():
        if count > 1 or any(e.name == name for e in config.remote_entries):
            raise GatewayConfigError(f"model {name!r}: a local model cannot share its name with another entry")
    ids = Counter(e.deployment for e in config.models if e.deployment)
    for dup, count in ids.items():
        if count > 1:
            raise GatewayConfigError(f"deployment id {dup!r} is used by {count} entries; ids must be unique")
    for entry in config.models:
        for fallback in entry.fallbacks:
            if fallback not in names:
                raise GatewayConfigError(
                    f"model {entry.name!r}: fallback {fallback!r} names no model in the config "
                    f"(models: {', '.join(sorted(names))})")
            if fallback == entry.name:
                raise GatewayConfigError(f"model {entry.name!r} names itself as a fallback")
        if check_env and entry.api_key_env and not os.environ.get(entry.api_key_env):
            raise GatewayConfigError(
                f"model {entry.name!r}: api_key_env {entry.api_key_env!r} is not set in the environment")


def _describe(err: ValidationError, raw: dict) -> str:
    first = err.errors()[0]
    loc = list(first.get("loc", ()))
    where = ".".join(str(p) for p in loc) or "config"
    if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
        entry = (raw.get("models") or [])[loc[1]]
        label = entry.get("name") if isinstance(entry, dict) else None
        rest = ".".join(str(p) for p in loc[2:])
        where = f"[[models]] #{loc[1] + 1}" + (f" ({label!r})" if label else "") + (f" {rest}" if rest else "")
    return f"{where}: {first['msg'].removeprefix('Value error, ')}"


def parse_gateway_config(raw: dict, source: str = "config", check_env: bool = True) -> GatewayConfig:
    try:
        config = GatewayConfig.model_validate(raw)
    except ValidationError as err:
        raise GatewayConfigError(f"{source}: {_describe(err, raw)}") from None
    try:
        check_references(config, check_env)
    except GatewayConfigError as err:
        raise GatewayConfigError(f"{source}: {err}") from None
    return config


def load_gateway_config(path: Path, check_env: bool = True) -> GatewayConfig:
    """Read and validate `path`; every problem is a GatewayConfigError naming the file and the entry.

    `check_env=False` skips the upstream key variables: `selfhost keys` needs only the ledger."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise GatewayConfigError(f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise GatewayConfigError(f"config file {str(path)!r} is not valid TOML: {err}") from None
    return parse_gateway_config(raw, source=str(path), check_env=check_env)
