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


@dataclass(frozen=True)
class PartialCall:
    """A call as far as the output has written it: `arguments` is the raw JSON text so far."""

    name: str | None
    arguments: str | None
    complete: bool


def parse_tool_calls(text: str, fmt: ToolCallFormat, new_id: Callable[[], str]) -> ParsedOutput:
    start = _call_start(text, fmt)
    if start is None:
        return ParsedOutput(text)
    objects = _call_objects(text[start:], fmt)
    raw = [c.arguments for c in scan_calls(text[start:], fmt)]
    raw += [None] * (len(objects or []) - len(raw))
    calls = [_to_call(obj, fmt, new_id, r) for obj, r in zip(objects or [], raw)]
    if not objects or any(c is None for c in calls):
        return ParsedOutput(text)
    return ParsedOutput(text[:start].strip(), calls)


def scan_calls(region: str, fmt: ToolCallFormat) -> list[PartialCall]:
    """The call objects of `region` (the output from the first call on), complete or not, in order.

    A call object is a `{...}` that no other object encloses (the list formats' `[...]` is
    transparent); its name and the raw text of its arguments are read as they stand, so a stream
    can send the arguments as they are written and the whole response carries the same text.
    """
    calls, at = [], 0
    while True:
        at = region.find("{", at)
        if at < 0:
            return calls
        call, end = _scan_object(region, at, fmt.arguments_key)
        calls.append(call)
        if end is None:
            return calls
        at = end


def _scan_object(text: str, start: int, arguments_key: str) -> tuple[PartialCall, int | None]:
    """Read one JSON object from `text[start]` (a '{'), which may be cut short."""
    depth, in_string, escaped = 0, False, False
    key, expecting_key, string_start = None, True, 0
    name, value_start, value_end = None, None, None
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
                if depth == 1 and expecting_key:
                    key = json.loads(text[string_start:i + 1])
                elif depth == 1 and key == "name":
                    name = json.loads(text[string_start:i + 1])
            continue
        if c == '"':
            in_string, string_start = True, i
            if depth == 1 and not expecting_key and key in (arguments_key, "arguments") and value_start is None:
                value_start = i
        elif c in "{[":
            if depth == 1 and not expecting_key and key in (arguments_key, "arguments") and value_start is None:
                value_start = i
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 1 and value_start is not None and value_end is None and key in (arguments_key, "arguments"):
                value_end = i + 1
            if depth == 0:
                arguments = text[value_start:value_end or i].strip() if value_start is not None else None
                return PartialCall(name, arguments, True), i + 1
        elif depth == 1 and c == ":":
            expecting_key = False
        elif depth == 1 and c == ",":
            if value_start is not None and value_end is None and key in (arguments_key, "arguments"):
                value_end = i
            expecting_key, key = True, None
        elif depth == 1 and not expecting_key and not c.isspace() and value_start is None \
                and key in (arguments_key, "arguments"):
            value_start = i  # a number, true, false or null
    arguments = text[value_start:value_end or len(text)] if value_start is not None else None
    return PartialCall(name, arguments, False), None


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


def _to_call(obj, fmt: ToolCallFormat, new_id: Callable[[], str], raw_arguments: str | None) -> ToolCall | None:
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
    # The model's own text when it is the object itself (what a stream sent), else a canonical one.
    text = raw_arguments if raw_arguments and raw_arguments.startswith("{") else None
    if text is None or _loads_or_none(text) != arguments:
        text = json.dumps(arguments, ensure_ascii=False)
    return ToolCall(id=new_id(), name=obj["name"], arguments=text)


def _loads_or_none(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


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
        self.ids: list[str] = []  # given to calls as they appear, kept for finish()

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

    def partial_calls(self) -> list[tuple[str, PartialCall]]:
        """(id, call) for each call written so far, complete or not; a call's id never changes."""
        start = _call_start(self.text, self.fmt) if self.in_calls else None
        if start is None:
            return []
        calls = scan_calls(self.text[start:], self.fmt)
        while len(self.ids) < len(calls):
            self.ids.append(self.new_id())
        return list(zip(self.ids, calls))

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The remaining text and the calls, once the output is complete."""
        given = iter(self.ids)
        parsed = parse_tool_calls(self.text, self.fmt, lambda: next(given, None) or self.new_id())
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
