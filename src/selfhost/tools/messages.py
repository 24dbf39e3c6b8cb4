"""A conversation with tools, made ready for one family's chat template.

Routes hand over messages as dicts with `role` and `content`, plus `tool_calls`
(ToolCall objects) on assistant turns and `tool_call_id` on tool results. A template
that renders tools itself gets them in transformers' convention (arguments as a
dict); for one that does not (the prompted format) selfhost writes the tools into a
system message, past calls as the call text the model is asked to write, and tool
results as user turns, since such templates know no `tool` role.
"""

from __future__ import annotations

import json
from typing import Any

from selfhost.tools.calls import ToolCall, ToolSpec
from selfhost.tools.formats import ToolCallFormat

Message = dict[str, Any]


def template_inputs(messages: list[Message], tools: list[ToolSpec], fmt: ToolCallFormat
                    ) -> tuple[list[Message], dict[str, Any]]:
    """(messages, extra chat-template variables) for rendering this conversation with `fmt`'s template."""
    if fmt.template_renders_tools:
        rendered = [_for_template(m) for m in messages]
        return rendered, ({"tools": [t.as_openai() for t in tools]} if tools else {})
    return _prompted(messages, tools, fmt), {}


def _for_template(message: Message) -> Message:
    out = {k: v for k, v in message.items() if k != "tool_calls"}
    calls: list[ToolCall] = message.get("tool_calls") or []
    if calls:
        out["tool_calls"] = [{"id": c.id, "type": "function",
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
        role = message["role"]
        if role == "tool":
            block = f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("from_tools"):  # results of one turn's calls share one user turn
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "from_tools": True})
            continue
        text = message.get("content") or ""
        calls: list[ToolCall] = message.get("tool_calls") or []
        if calls:
            blocks = [f"{fmt.opener}\n{json.dumps({'name': c.name, 'arguments': c.arguments_dict})}\n{fmt.closer}"
                      for c in calls]
            text = "\n".join(([text] if text else []) + blocks)
        out.append({"role": role, "content": text})
    return [{k: v for k, v in m.items() if k != "from_tools"} for m in out]
