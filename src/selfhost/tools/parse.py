"""Find the tool calls in what a model wrote: the whole output at once, or as it streams.

Both read the output decoded *with* special tokens (a family's call marker may be
one, e.g. Mistral's [TOOL_CALLS]) and share one parser, so a streamed response
reassembles to exactly the calls of the whole one. Text that looks like a call but
does not parse as one stays text: a model that was not constrained may write
anything.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from selfhost.tools.calls import ToolCall
from selfhost.tools.formats import ToolCallFormat

_decoder = json.JSONDecoder()


@dataclass(frozen=True)
class ParsedOutput:
    content: str
    calls: list[ToolCall] = field(default_factory=list)


def parse_tool_calls(text: str, fmt: ToolCallFormat, new_id: Callable[[], str]) -> ParsedOutput:
    start = _call_start(text, fmt)
    if start is None:
        return ParsedOutput(text)
    objects = _call_objects(text[start:], fmt)
    calls = [_to_call(obj, fmt, new_id) for obj in objects or []]
    if not objects or any(c is None for c in calls):
        return ParsedOutput(text)
    return ParsedOutput(text[:start].strip(), calls)


def _call_start(text: str, fmt: ToolCallFormat) -> int | None:
    at = text.find(fmt.opener)
    if at >= 0:
        return at
    if fmt.opener_optional and text.lstrip().startswith("{"):
        return len(text) - len(text.lstrip())
    return None


def _call_objects(text: str, fmt: ToolCallFormat) -> list | None:
    """The call objects in `text` (which starts at the first call), or None if it is not calls and only calls."""
    objects = []
    rest = text
    while rest.strip():
        rest = rest.lstrip()
        if rest.startswith(fmt.opener):
            rest = rest[len(fmt.opener):].lstrip()
        elif objects or not fmt.opener_optional:
            return None
        try:
            value, end = _decoder.raw_decode(rest)
        except json.JSONDecodeError:
            return None
        values = value if fmt.as_list and isinstance(value, list) else [value]
        objects.extend(values)
        rest = rest[end:].lstrip()
        if fmt.closer and rest.startswith(fmt.closer):
            rest = rest[len(fmt.closer):]
        if fmt.opener_optional:  # one call, then only an end-of-turn
            return objects if not rest.strip() else None
    return objects


def _to_call(obj, fmt: ToolCallFormat, new_id: Callable[[], str]) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get(fmt.arguments_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(id=new_id(), name=obj["name"], arguments=json.dumps(arguments, ensure_ascii=False))


class ToolCallStream:
    """Splits a growing output into text deltas and, at the end, its calls.

    `update(text_so_far)` returns the new text that is certainly not part of a call;
    text that might open one (a prefix of the marker, or a llama3 output that starts
    with '{') is held until it is decided. `finish()` parses what was held: calls,
    or, if they do not parse, the held text.
    """

    def __init__(self, fmt: ToolCallFormat, new_id: Callable[[], str]):
        self.fmt, self.new_id = fmt, new_id
        self.sent = 0  # characters of the output already returned as text
        self.text = ""
        self.in_calls = False

    def update(self, text: str) -> str:
        self.text = text
        if self.in_calls:
            return ""
        start = _call_start(text, self.fmt)
        if start is None and self.fmt.opener_optional and not text.strip():
            return ""  # only whitespace so far: a call may still follow
        if start is not None:
            self.in_calls = True
            return self._send_until(start)
        return self._send_until(len(text) - _held_prefix(text, self.fmt.opener))

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The remaining text and the calls, once the output is complete."""
        parsed = parse_tool_calls(self.text, self.fmt, self.new_id)
        if parsed.calls:
            return "", parsed.calls
        return self._send_until(len(self.text)), []

    def _send_until(self, end: int) -> str:
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:end], end
        return out


def _held_prefix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker` (it may become the marker)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
