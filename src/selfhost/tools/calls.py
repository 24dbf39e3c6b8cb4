"""The API-neutral shapes of tool calling: what a tool is, what a call is, what the client allows.

OpenAI, Ollama, Anthropic and the Responses API each spell these differently; their
routes convert to these, and everything below the routes (chat templates, grammars,
parsing) sees only these.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any, Literal

from selfhost.errors import InvalidParameterError

# OpenAI's rule for function names; the other APIs' names fit it too.
FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolSpec:
    """One function the model may call: its name, what it does, and its arguments' JSON schema."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: dict(EMPTY_PARAMETERS))

    def check(self, where: str) -> None:
        """`where` is the request field that holds this tool, for the error message."""
        if not FUNCTION_NAME.match(self.name or ""):
            raise InvalidParameterError(f"{where}.name={self.name!r} must be 1-64 letters, digits, '_' or '-'",
                                        param=f"{where}.name")
        if not isinstance(self.parameters, dict):
            raise InvalidParameterError(f"{where}.parameters must be a JSON schema object", param=f"{where}.parameters")
        kind = self.parameters.get("type", "object")
        if kind != "object":
            raise InvalidParameterError(f"{where}.parameters must describe an object (type 'object'), not {kind!r}",
                                        param=f"{where}.parameters")

    def as_openai(self) -> dict[str, Any]:
        """The shape chat templates expect in their `tools` variable (transformers' convention)."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: `arguments` is the JSON text of the arguments object."""

    id: str
    name: str
    arguments: str

    @property
    def arguments_dict(self) -> dict[str, Any]:
        return json.loads(self.arguments)


@dataclass(frozen=True)
class ToolChoice:
    """auto: the model decides; none: no calls; required: at least one call; function: that function."""

    mode: Literal["auto", "none", "required", "function"] = "auto"
    function: str | None = None


def check_tools(tools: list[ToolSpec], choice: ToolChoice, field_name: str = "tools") -> None:
    """Every tool well formed, names unique, and a named choice naming one of them."""
    seen = set()
    for i, tool in enumerate(tools):
        tool.check(f"{field_name}[{i}].function" if field_name == "tools" else f"{field_name}[{i}]")
        if tool.name in seen:
            raise InvalidParameterError(f"{field_name}[{i}]: the function name {tool.name!r} is defined twice",
                                        param=field_name)
        seen.add(tool.name)
    if choice.mode in ("required", "function") and not tools:
        raise InvalidParameterError(f"tool_choice={choice.mode!r} needs at least one tool in {field_name}",
                                    param="tool_choice")
    if choice.mode == "function" and choice.function not in seen:
        raise InvalidParameterError(f"tool_choice names {choice.function!r}, which is not among the tools "
                                    f"({', '.join(sorted(seen))})", param="tool_choice")


def new_call_id(length: int | None = None) -> str:
    """OpenAI-style `call_...` ids; a fixed `length` of letters and digits where a template demands it (Mistral: 9)."""
    if length is not None:
        alphabet = string.ascii_letters + string.digits
        return "".join(secrets.choice(alphabet) for _ in range(length))
    return "call_" + secrets.token_hex(12)
