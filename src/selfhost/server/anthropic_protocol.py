"""Anthropic Messages API wire models: requests (which turn themselves into API-neutral messages) and responses.

Content is a string or a list of blocks (`text`, `tool_use`, `tool_result`); a block of
any other type (images, documents) fails validation, so it is a 400 naming the field.
Unknown fields are ignored, as in protocol.py.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, model_validator

from selfhost.sampling_params import SamplingParams
from selfhost.server.wire import MAX_STOP_STRINGS, Lenient, Seed
from selfhost.structured_output import StructuredOutput
from selfhost.tools.calls import ToolCall, ToolChoice, ToolSpec

# Anthropic documents no limit; the same bound as the OpenAI routes' `stop`.
MAX_STOP_SEQUENCES = 16


def message_id() -> str:
    return "msg_" + uuid.uuid4().hex[:24]


def tool_use_id(call_id: str) -> str:
    """Anthropic's `toolu_` ids for the parser's `call_` ones."""
    return "toolu_" + call_id.removeprefix("call_")


class TextBlock(Lenient):
    type: Literal["text"] = "text"
    text: str


class ToolUseBlock(Lenient):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(Lenient):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(b.text for b in self.content)
        return self.content or ""


ContentBlock = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]


class AnthropicMessage(Lenient):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]

    @model_validator(mode="after")
    def _check_blocks(self):
        if isinstance(self.content, list):
            kinds = {b.type for b in self.content}
            if self.role == "user" and "tool_use" in kinds:
                raise ValueError("tool_use blocks belong in assistant messages")
            if self.role == "assistant" and "tool_result" in kinds:
                raise ValueError("tool_result blocks belong in user messages")
        return self

    def as_dicts(self) -> list[dict[str, Any]]:
        """API-neutral messages (selfhost.tools.messages): tool results become `tool` turns before the user's text,
        tool_use blocks the assistant turn's `tool_calls`."""
        if isinstance(self.content, str):
            return [{"role": self.role, "content": self.content}]
        text = "".join(b.text for b in self.content if isinstance(b, TextBlock))
        results = [{"role": "tool", "tool_call_id": b.tool_use_id, "content": b.text()}
                   for b in self.content if isinstance(b, ToolResultBlock)]
        calls = [ToolCall(b.id, b.name, json.dumps(b.input)) for b in self.content if isinstance(b, ToolUseBlock)]
        if calls:
            return [{"role": "assistant", "content": text, "tool_calls": calls}]
        return results + ([{"role": self.role, "content": text}] if text or not results else [])


class AnthropicTool(Lenient):
    name: str
    description: str | None = None
    input_schema: dict[str, Any]

    def spec(self) -> ToolSpec:
        return ToolSpec(self.name, self.description or "", self.input_schema)


class AnthropicToolChoice(Lenient):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _check_name(self):
        if self.type == "tool" and not self.name:
            raise ValueError("tool_choice of type 'tool' needs the tool's name")
        return self

    def choice(self) -> ToolChoice:
        modes = {"auto": "auto", "any": "required", "none": "none", "tool": "function"}
        return ToolChoice(modes[self.type], self.name if self.type == "tool" else None)


class ConversationFields(Lenient):
    """What a message request and a count_tokens request share: the prompt."""

    model: str = Field(min_length=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None

    def tool_specs(self) -> list[ToolSpec]:
        return [t.spec() for t in self.tools or []]

    def choice_of_tool(self) -> ToolChoice:
        """Anthropic's default is `auto`."""
        return self.tool_choice.choice() if self.tool_choice is not None else ToolChoice("auto")

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) and self.choice_of_tool().mode != "none"

    def message_dicts(self) -> list[dict[str, Any]]:
        system = "".join(b.text for b in self.system) if isinstance(self.system, list) else self.system
        out = [{"role": "system", "content": system}] if system else []
        for message in self.messages:
            out.extend(message.as_dicts())
        return out


class MessagesRequest(ConversationFields):
    max_tokens: int = Field(ge=1)
    temperature: float = Field(1.0, ge=0, le=1)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    stop_sequences: list[str] | None = Field(None, max_length=MAX_STOP_STRINGS)
    stream: bool = False
    metadata: dict[str, Any] | None = None
    seed: Seed | None = None  # selfhost extension (the SDK's extra_body): reproducible sampling

    @model_validator(mode="after")
    def _check_stops(self):
        stops = self.stop_sequences or []
        if any(not s for s in stops):
            raise ValueError("stop_sequences must be non-empty strings")
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"stop_sequences has {len(stops)} entries; at most {MAX_STOP_SEQUENCES} are accepted")
        return self

    def sampling_params(self, max_tokens: int, constraint: StructuredOutput | None) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              seed=self.seed, stop=tuple(self.stop_sequences or ()), structured_output=constraint)


class CountTokensRequest(ConversationFields):
    pass


# -- responses ------------------------------------------------------------------

class AnthropicUsage(BaseModel):
    input_tokens: int  # Anthropic's count leaves out the prompt tokens read from the cache
    output_tokens: int
    cache_read_input_tokens: int = 0  # prompt tokens read from the prefix cache


class MessageResponse(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[TextBlock | ToolUseBlock]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None = None
    usage: AnthropicUsage


class TokenCount(BaseModel):
    input_tokens: int
