"""A conversation with tools, made ready for one family's chat template.

Routes hand over messages as dicts with `role` and `content`, plus `tool_calls`
(ToolCall objects) on assistant turns and `tool_call_id` on tool results. A template
that renders tools itself gets them in transformers' convention (arguments as a
dict); for one that does not (the prompted format) selfhost writes the tools into a
system message, past calls as the call text the model is asked to write, and tool
results as user turns, since such templates know no `tool` role.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from selfhost.tools.calls import ToolCall, ToolSpec
from selfhost.tools.formats import ToolCallFormat

Message = dict[str, Any]


def template_inputs(messages: list[Message], tools: list[ToolSpec], fmt: ToolCallFormat
                    ) -> tuple[list[Message], dict[str, Any]]:
    """(messages, extra chat-template variables) for rendering this conversation with `fmt`'s template."""
    if fmt.template_renders_tools:
        rendered = [_for_template(m, fmt.call_id_length) for m in messages]
        return rendered, ({"tools": [t.as_openai() for t in tools]} if tools else {})
    if fmt.tools_on_system_message:
        return _tools_on_system_message(messages, tools, fmt), {}
    return _prompted(messages, tools, fmt), {}


def _call_text(calls: list[ToolCall], fmt: ToolCallFormat) -> str:
    """Past calls written the way the model is asked to write them."""
    if fmt.as_list:
        return fmt.opener + json.dumps([{"name": c.name, "arguments": c.arguments_dict} for c in calls]) + fmt.closer
    return "\n".join(f"{fmt.opener}\n{json.dumps({'name': c.name, 'arguments': c.arguments_dict})}\n{fmt.closer}"
                     for c in calls)


def _with_calls_as_text(message: Message, fmt: ToolCallFormat) -> Message:
    text = message.get("content") or ""
    calls: list[ToolCall] = message.get("tool_calls") or []
    if calls:
        text = "\n".join(([text] if text else []) + [_call_text(calls, fmt)])
    return {"role": message["role"], "content": text}


def _tools_on_system_message(messages: list[Message], tools: list[ToolSpec], fmt: ToolCallFormat) -> list[Message]:
    out = [_with_calls_as_text(m, fmt) for m in messages]
    if tools:
        described = json.dumps([t.as_openai()["function"] for t in tools])
        if out and out[0]["role"] == "system":
            out[0]["tools"] = described
        else:
            out.insert(0, {"role": "system", "content": "", "tools": described})
    return out


def _template_id(call_id: str, length: int | None) -> str:
    """A client's call id as the template accepts it: Mistral's checks for exactly 9 letters and digits,
    so other ids map to a stable 9-character digest (the call and its result map alike)."""
    if length is None or (len(call_id) == length and call_id.isalnum()):
        return call_id
    return hashlib.sha256(call_id.encode()).hexdigest()[:length]


def _for_template(message: Message, id_length: int | None) -> Message:
    out = {k: v for k, v in message.items() if k != "tool_calls"}
    if "tool_call_id" in out:
        out["tool_call_id"] = _template_id(out["tool_call_id"], id_length)
    calls: list[ToolCall] = message.get("tool_calls") or []
    if calls:
        out["tool_calls"] = [{"id": _template_id(c.id, id_length), "type": "function",
                              "function": {"name": c.name, "arguments": c.arguments_dict}} for c in calls]
        out.setdefault("content", "")
        if out["content"] is None:
            out["content"] = ""
    return out


def _prompted(messages: list[Message], tools: list[ToolSpec], fmt: ToolCallFormat) -> list[Message]:
    out: list[Message] = []
    if tools:
        instructions = fmt.system_prompt(tools)
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": f"{messages[0]['content']}\n\n{instructions}"})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": instructions})
    for message in messages:
        if message["role"] == "tool":
            message = {"role": "user", "content": f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"}
        else:
            message = _with_calls_as_text(message, fmt)
        if out and out[-1]["role"] == "user" and message["role"] == "user":
            # Results, and a question after them, share one user turn: templates such as
            # Gemma's insist that user and assistant turns alternate.
            out[-1] = {"role": "user", "content": f"{out[-1]['content']}\n{message['content']}"}
        else:
            out.append(message)
    return out
