"""OpenAI Responses API wire models: the request, its input items, and the output items it answers with.

Input items are messages (`input_text` / `output_text` parts or a string), `function_call`
items (the model's earlier calls) and `function_call_output` items (their results); an
item without a `type` is a message, as OpenAI accepts. Items are stored as plain dicts
(responses_store.py) and read back through these same models.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Field, Tag, model_validator

from selfhost.sampling_params import SamplingParams
from selfhost.server.wire import Lenient, Seed
from selfhost.structured_output import StructuredOutput, closed_objects
from selfhost.tools.calls import ToolCall, ToolChoice, ToolSpec


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ContentPart(Lenient):
    type: Literal["input_text", "output_text", "text"]
    text: str


class MessageItem(Lenient):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(Lenient):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str  # JSON text

    @model_validator(mode="after")
    def _check_arguments(self):
        try:
            arguments = json.loads(self.arguments or "{}")
        except json.JSONDecodeError as err:
            raise ValueError(f"function_call {self.call_id!r}: arguments is not JSON ({err})") from err
        if not isinstance(arguments, dict):
            raise ValueError(f"function_call {self.call_id!r}: arguments must be a JSON object")
        return self


class FunctionCallOutputItem(Lenient):
    type: Literal["function_call_output"]
    call_id: str
    output: str


def _item_type(value: Any) -> str:
    return value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", "message")


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_type),
]


def as_messages(items: list[MessageItem | FunctionCallItem | FunctionCallOutputItem]) -> list[dict[str, Any]]:
    """API-neutral messages (selfhost.tools.messages): consecutive calls join one assistant turn."""
    out: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, MessageItem):
            role = "system" if item.role == "developer" else item.role
            out.append({"role": role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            call = ToolCall(item.call_id, item.name, item.arguments or "{}")
            if out and out[-1]["role"] == "assistant" and "tool_calls" in out[-1]:
                out[-1]["tool_calls"].append(call)
            elif out and out[-1]["role"] == "assistant":
                out[-1]["tool_calls"] = [call]
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        else:
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
    return out


class FunctionTool(Lenient):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def spec(self) -> ToolSpec:
        return ToolSpec(self.name, self.description or "",
                        self.parameters if self.parameters is not None else {"type": "object", "properties": {}})


class NamedFunctionChoice(Lenient):
    type: Literal["function"]
    name: str


class TextFormat(Lenient):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _check_schema(self):
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("format type 'json_schema' needs a schema")
        return self

    def structured_output(self) -> StructuredOutput | None:
        if self.type == "json_object":
            return StructuredOutput(json_object=True)
        if self.type == "json_schema":
            return StructuredOutput(json_schema=closed_objects(self.schema_))
        return None


class TextConfig(Lenient):
    format: TextFormat | None = None


class ResponsesRequest(Lenient):
    model: str = Field(min_length=1)
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool = True
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    text: TextConfig | None = None
    store: bool = True
    previous_response_id: str | None = None
    stream: bool = False
    metadata: dict[str, str] | None = None
    user: str | None = None
    seed: Seed | None = None  # selfhost extension: reproducible sampling

    def input_items(self) -> list[MessageItem | FunctionCallItem | FunctionCallOutputItem]:
        return [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) else list(self.input)

    def tool_specs(self) -> list[ToolSpec]:
        return [t.spec() for t in self.tools or []]

    def choice_of_tool(self) -> ToolChoice:
        choice = self.tool_choice
        if isinstance(choice, NamedFunctionChoice):
            return ToolChoice("function", choice.name)
        return ToolChoice(choice or ("auto" if self.tools else "none"))

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) and self.choice_of_tool().mode != "none"

    def text_constraint(self) -> StructuredOutput | None:
        return self.text.format.structured_output() if self.text and self.text.format else None

    def sampling_params(self, max_tokens: int, constraint: StructuredOutput | None) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed,
                              structured_output=constraint)


# -- responses ------------------------------------------------------------------

class ResponseUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: dict[str, int] = Field(default_factory=lambda: {"cached_tokens": 0})
    output_tokens_details: dict[str, int] = Field(default_factory=lambda: {"reasoning_tokens": 0})


class ResponseObject(BaseModel):
    """The response as returned, stored and fetched; `output` holds message and function_call items as dicts."""

    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    model: str
    output: list[dict[str, Any]] = Field(default_factory=list)
    usage: ResponseUsage | None = None
    incomplete_details: dict[str, str] | None = None
    error: dict[str, Any] | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    parallel_tool_calls: bool = True
    tool_choice: Any = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    metadata: dict[str, str] = Field(default_factory=dict)


def message_item(text: str, status: str = "completed", id_: str | None = None) -> dict[str, Any]:
    return {"type": "message", "id": id_ or item_id("msg"), "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []}


def function_call_item(call: ToolCall, status: str = "completed", id_: str | None = None) -> dict[str, Any]:
    return {"type": "function_call", "id": id_ or item_id("fc"), "call_id": call.id, "name": call.name,
            "arguments": call.arguments if status == "completed" else "", "status": status}
