"""Each family's tool-call format: how its chat template is given tools, how its models write calls.

A format knows three things:
- how the conversation is rendered: the family's own chat template receives `tools`
  (transformers' convention) when it renders them; otherwise selfhost describes the
  tools in a system message of its own (the "prompted" format below, documented in
  docs/SERVER.md);
- the text of a call: the markers around it and the JSON inside (`{"name", "arguments"}`
  in most families, `"parameters"` in Llama 3's);
- the grammar that makes a call valid: with tool_choice `required` or a named function the
  whole output is call(s) whose arguments follow the function's JSON schema; with `auto` the
  text is free until the model writes the call's opening marker, and from there the call is
  constrained the same way. A marker that is one token of the vocabulary is matched as that
  token (`<[id]>` in llguidance's Lark), so free text can never contain it by accident.

Formats (where each comes from is in tests/chat_templates/SOURCES.md):
  hermes      <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>, one block per call
              (Qwen2.5, Qwen3, and Hermes-style templates)
  mistral     [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]
  phi4        <|tool_call|>[{"name": ..., "arguments": {...}}]<|/tool_call|>  (Phi-4-mini; its template
              takes the tools as JSON text on the system message)
  llama3      {"name": ..., "parameters": {...}}, one call, optionally after <|python_tag|>
  prompted    hermes' text, described by selfhost in a system message, for templates without tools
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from selfhost.structured_output import JSON_LAYOUT, StructuredOutput, closed_objects
from selfhost.tools.calls import ToolChoice, ToolSpec

# Short: small models have short context windows.
# Calls one turn may make when parallel calls are allowed: a bound keeps a model that never
# stops calling from filling max_tokens with calls.
MAX_PARALLEL_CALLS = 8

PROMPTED_INSTRUCTIONS = (
    "Functions:\n{tools}\nCall with <tool_call>\n{{\"name\": ..., \"arguments\": {{...}}}}\n</tool_call>; "
    "results come in <tool_response> blocks."
)


@dataclass(frozen=True)
class ToolCallFormat:
    name: str
    opener: str  # text that starts a call (or a list of calls)
    closer: str  # text that ends it ("" when the end of the output ends it)
    arguments_key: str = "arguments"
    as_list: bool = False  # the calls are one JSON array after the opener
    separator: str = "\n"  # between blocks, when each call has its own opener
    parallel: bool = True  # whether the family writes several calls in one turn
    template_renders_tools: bool = True
    # Phi-4-mini's template takes the tools as JSON text on the system message (its `tools` key)
    # and does not render past calls: those go in as the assistant's text.
    tools_on_system_message: bool = False
    opener_optional: bool = False  # llama3: a bare JSON object is a call too
    call_id_length: int | None = None  # mistral's template checks its ids are 9 characters

    # -- the conversation ------------------------------------------------------------

    def system_prompt(self, tools: list[ToolSpec]) -> str:
        """For the prompted format only: the message that describes the tools."""
        described = [{"name": t.name, **({"description": t.description} if t.description else {}),
                      "parameters": t.parameters} for t in tools]
        return PROMPTED_INSTRUCTIONS.format(tools="\n".join(json.dumps(d) for d in described))

    # -- the grammar --------------------------------------------------------------------

    def call_schema(self, tools: list[ToolSpec]) -> dict[str, Any]:
        """JSON schema of one call object: the function's name and its arguments' schema, for any tool."""
        variants = [{
            "type": "object",
            "properties": {"name": {"const": t.name}, self.arguments_key: closed_objects(t.parameters)},
            "required": ["name", self.arguments_key], "additionalProperties": False,
        } for t in tools]
        schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
        return {**schema, "x-guidance": JSON_LAYOUT}

    def constraint(self, tools: list[ToolSpec], choice: ToolChoice, parallel: bool,
                   markers: dict[str, int]) -> StructuredOutput | None:
        """The output constraint for this request; `markers`: marker text -> its token id, where it is one token."""
        if choice.mode == "none" or not tools:
            return None
        callable_tools = [t for t in tools if choice.mode != "function" or t.name == choice.function]
        parallel = parallel and self.parallel and choice.mode != "function"
        calls = self._calls_rule(parallel, markers)
        call_json = f"call_json: %json {json.dumps(self.call_schema(callable_tools))}"
        if choice.mode in ("required", "function"):
            return StructuredOutput(grammar=f"start: calls\n{calls}\n{call_json}\n")
        # auto: free text, then (optionally) the calls, constrained from their opening marker on.
        text = _free_text(self, markers)
        start = "start: TEXT | calls" if self.opener_optional else "start: TEXT | TEXT? calls"
        return StructuredOutput(grammar=f"{start}\n{calls}\n{call_json}\n{text}\n")

    def _calls_rule(self, parallel: bool, markers: dict[str, int]) -> str:
        opener, closer = _lark_marker(self.opener, markers), _lark_marker(self.closer, markers)
        if self.as_list:
            items = f'call_json (", " call_json)~0..{MAX_PARALLEL_CALLS - 1}' if parallel else "call_json"
            return f'calls: {opener} "[" {items} "]" {closer}'.rstrip()
        if self.opener_optional:  # llama3: one bare object, with or without <|python_tag|>
            return f"calls: {opener}? call_json" if opener != '""' else "calls: call_json"
        block = f"{opener} \"\\n\" call_json \"\\n\" {closer}"
        sep = json.dumps(self.separator)
        if parallel:
            return f"calls: block ({sep} block)~0..{MAX_PARALLEL_CALLS - 1}\nblock: {block}"
        return f"calls: block\nblock: {block}"


def _lark_marker(text: str, markers: dict[str, int]) -> str:
    if not text:
        return '""'
    token_id = markers.get(text)
    return f"<[{token_id}]>" if token_id is not None else json.dumps(text)


def _free_text(fmt: ToolCallFormat, markers: dict[str, int]) -> str:
    """Text before a call. It cannot contain the opener: a one-token opener is a token text never
    matches; a written-out one is excluded from the text's language."""
    if fmt.opener_optional:
        # llama3: a call is a bare JSON object, so text may not start like one.
        return "TEXT: /[^{\\s](?s:.*)/"
    if fmt.opener in markers:
        return "TEXT: /(?s:.+)/"
    return f"TEXT: /(?s:.+)/ & ~/(?s:.*{_regex_escape(fmt.opener)}.*)/"


def _regex_escape(text: str) -> str:
    return "".join("\\" + c if c in r"\.^$|?*+()[]{}/" else c for c in text)


HERMES = ToolCallFormat("hermes", opener="<tool_call>", closer="</tool_call>")
MISTRAL = ToolCallFormat("mistral", opener="[TOOL_CALLS]", closer="", as_list=True, call_id_length=9)
PHI4 = ToolCallFormat("phi4", opener="<|tool_call|>", closer="<|/tool_call|>", as_list=True,
                      template_renders_tools=False, tools_on_system_message=True)
LLAMA3 = ToolCallFormat("llama3", opener="<|python_tag|>", closer="", arguments_key="parameters", parallel=False,
                        opener_optional=True)
PROMPTED = ToolCallFormat("prompted", opener="<tool_call>", closer="</tool_call>", template_renders_tools=False)


def detect_format(chat_template: str | None) -> ToolCallFormat:
    """The format a chat template implies, from the markers it writes; `prompted` when it shows no tools."""
    template = chat_template or ""
    if "tools" not in template:
        return PROMPTED
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<|tool_call|>" in template or "<|tool|>" in template:
        return PHI4
    if "<tool_call>" in template:
        return HERMES
    if "<|python_tag|>" in template or "ipython" in template:
        return LLAMA3
    return PROMPTED
