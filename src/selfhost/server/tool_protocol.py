"""OpenAI wire models for output shape and tools: response_format, tools, tool_choice, tool calls.

Requests convert to selfhost's API-neutral StructuredOutput and ToolSpec here; the stream's
tool-call deltas are at the end.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from selfhost.server.wire import Lenient
from selfhost.structured_output import StructuredOutput, closed_objects
from selfhost.tools.calls import ToolSpec


class FunctionCall(Lenient):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallItem(Lenient):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class JsonSchemaFormat(Lenient):
    name: str = Field("response", pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check_schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a json_schema object with a schema")
        return self

    def structured_output(self) -> StructuredOutput | None:
        if self.type == "json_object":
            return StructuredOutput(json_object=True)
        if self.type == "json_schema":
            return StructuredOutput(json_schema=closed_objects(self.json_schema.schema_))
        return None


class FunctionDefinition(Lenient):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(Lenient):
    type: Literal["function"]
    function: FunctionDefinition

    def spec(self) -> ToolSpec:
        f = self.function
        return ToolSpec(f.name, f.description or "", f.parameters if f.parameters is not None else
                        {"type": "object", "properties": {}})


class NamedFunction(Lenient):
    name: str


class NamedToolChoice(Lenient):
    type: Literal["function"]
    function: NamedFunction


class StructuredOutputs(Lenient):
    """vLLM's `structured_outputs` extension: a regex, a choice list or a Lark grammar (or a JSON schema)."""

    json_: dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def structured_output(self) -> StructuredOutput:
        return StructuredOutput(json_schema=self.json_, regex=self.regex,
                                choice=tuple(self.choice) if self.choice is not None else None, grammar=self.grammar)


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall
