"""Ollama wire models (/api/chat, /api/generate, /api/show) and the `options` -> SamplingParams map."""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from selfhost.sampling_params import SamplingParams
from selfhost.server.tool_protocol import ToolDefinition
from selfhost.server.wire import MAX_STOP_STRINGS, Seed
from selfhost.structured_output import StructuredOutput, closed_objects
from selfhost.tools.calls import ToolCall, new_call_id

_DURATION = re.compile(r"^(-?[0-9]*\.?[0-9]+)(ms|s|m|h)?$")
_UNIT_S = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Options(Lenient):
    """Ollama's runtime options that map onto sampling; unknown ones (num_ctx, mirostat...) are ignored."""

    num_predict: int | None = Field(None, ge=-2)  # -1: until done, -2: fill the context
    temperature: float = Field(0.8, ge=0, le=2)
    top_p: float = Field(0.9, gt=0, le=1)
    top_k: int | None = Field(40, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    repeat_penalty: float = Field(1.1, gt=0, le=10)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: Seed | None = None
    stop: list[str] | None = Field(None, max_length=MAX_STOP_STRINGS)

    @field_validator("stop")
    @classmethod
    def _non_empty(cls, value):
        if value and any(not s for s in value):
            raise ValueError("stop strings must be non-empty")
        return value

    @property
    def max_tokens(self) -> int | None:
        return None if self.num_predict is None or self.num_predict < 0 else max(self.num_predict, 1)

    def sampling_params(self, max_tokens: int, structured_output: StructuredOutput | None = None) -> SamplingParams:
        return SamplingParams(
            structured_output=structured_output,
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k or None,  # Ollama's 0 means "off"
            min_p=self.min_p,
            repetition_penalty=self.repeat_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            stop=tuple(self.stop or ()),
        )


class OllamaBase(Lenient):
    model: str = Field(min_length=1)
    stream: bool = True
    format: Literal["", "json"] | dict[str, Any] | None = None
    options: Options = Field(default_factory=Options)
    keep_alive: str | float | int | None = None

    def structured_output(self) -> StructuredOutput | None:
        """`format`: "json" is any JSON object; a dict is a JSON schema the output follows."""
        if self.format == "json":
            return StructuredOutput(json_object=True)
        if isinstance(self.format, dict):
            return StructuredOutput(json_schema=closed_objects(self.format))
        return None

    def keep_alive_s(self) -> float | None:
        """'5m', '30s', 300 -> seconds; negative = forever; None = server default."""
        value = self.keep_alive
        if value is None or isinstance(value, (int, float)):
            return value
        match = _DURATION.match(value.strip())
        if not match:
            raise ValueError(f"keep_alive={value!r} is not a duration like '5m', '30s' or 300")
        return float(match.group(1)) * _UNIT_S[match.group(2)]

    @field_validator("keep_alive")
    @classmethod
    def _check_keep_alive(cls, value):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"keep_alive={value!r} is not a finite number of seconds")
        if isinstance(value, str) and not _DURATION.match(value.strip()):
            raise ValueError(f"keep_alive={value!r} is not a duration like '5m', '30s' or 300")
        return value


class TextOnly(Lenient):
    """A request part that may carry Ollama's `images`, which text-only models refuse."""

    images: list[str] | None = None

    @field_validator("images")
    @classmethod
    def _no_images(cls, value):
        if value:
            raise ValueError("images are not supported: selfhost serves text-only models")
        return value


class OllamaFunctionCall(Lenient):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)  # an object, where OpenAI sends JSON text


class OllamaToolCall(Lenient):
    function: OllamaFunctionCall


class OllamaMessage(TextOnly):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None  # tool turns: the function whose result this is

    def as_dict(self) -> dict[str, Any]:
        """The API-neutral message (selfhost.tools.messages). Ollama calls carry no ids; the template gets new ones."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [ToolCall(new_call_id(), c.function.name, json.dumps(c.function.arguments))
                                 for c in self.tool_calls]
        if self.role == "tool":
            out["tool_call_id"] = self.tool_name or ""
            if self.tool_name:
                out["name"] = self.tool_name
        return out


class OllamaChatRequest(OllamaBase):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[ToolDefinition] | None = None


class OllamaGenerateRequest(OllamaBase, TextOnly):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    context: list[int] | None = None  # accepted for compatibility; not used to continue a conversation


class OllamaShowRequest(Lenient):
    model: str = Field("", description="Model name (older clients send it as `name`).")
    name: str | None = None

    @property
    def model_name(self) -> str:
        return self.model or self.name or ""
