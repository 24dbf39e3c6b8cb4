"""StructuredOutput: what shape a request's output must have.

Exactly one of a JSON schema, any JSON object, a regular expression, a choice
between fixed strings or a Lark grammar. The engine compiles it with
llguidance (engine/grammar.py) and masks, at every step, the tokens after which
the output could no longer match, so what comes back always parses.

This file only describes the constraint; it never imports llguidance, so
SamplingParams stays cheap to build and to pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from selfhost.errors import InvalidParameterError

# How JSON is laid out between tokens. Python's json.dumps style (", " and ": ") is
# the most common layout in the text models learn from, so it costs them the least;
# no other whitespace, so a model cannot pad its output with blanks until max_tokens.
JSON_LAYOUT = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


@dataclass(frozen=True)
class StructuredOutput:
    """One constraint on the generated text; set exactly one field.

    json_schema: a JSON Schema (dict or JSON text); the output is one instance of it.
    json_object: any JSON object (`response_format: {"type": "json_object"}`).
    regex: the whole output matches this regular expression.
    choice: the output is exactly one of these strings.
    grammar: a Lark grammar in llguidance's dialect (which also embeds JSON schemas
        with `%json {...}`); its `start` rule is the whole output.
    """

    json_schema: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        if isinstance(self.json_schema, str):
            try:
                object.__setattr__(self, "json_schema", json.loads(self.json_schema))
            except json.JSONDecodeError as err:
                raise InvalidParameterError(f"json_schema is not valid JSON: {err}", param="json_schema") from err
        given = [name for name in ("json_schema", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise InvalidParameterError(
                f"StructuredOutput needs exactly one of json_schema, json_object, regex, choice, grammar; got "
                f"{', '.join(given) or 'none'}", param="structured_output")
        if self.json_schema is not None and not isinstance(self.json_schema, (dict, bool)):
            raise InvalidParameterError("json_schema must be a JSON object", param="json_schema")
        if self.choice is not None and not (self.choice and all(isinstance(c, str) and c for c in self.choice)):
            raise InvalidParameterError("choice must be a non-empty list of non-empty strings", param="choice")

    @property
    def key(self) -> str:
        """A canonical text of the constraint: the compiled-grammar cache's key."""
        return json.dumps({"json_schema": self.json_schema, "json_object": self.json_object, "regex": self.regex,
                           "choice": self.choice, "grammar": self.grammar}, sort_keys=True)

    def llguidance_grammar(self) -> str:
        """The constraint as an llguidance grammar (JSON text of its top-level grammar list)."""
        if self.json_object:
            return _json_grammar({"type": "object"})
        if self.json_schema is not None:
            return _json_grammar(self.json_schema)
        if self.regex is not None:
            return json.dumps({"grammars": [{"lark_grammar": f"start: /{_lark_regex_body(self.regex)}/"}]})
        if self.choice is not None:
            alternatives = " | ".join(json.dumps(c) for c in self.choice)
            return json.dumps({"grammars": [{"lark_grammar": f"start: {alternatives}"}]})
        return json.dumps({"grammars": [{"lark_grammar": self.grammar}]})


def closed_objects(schema: Any) -> Any:
    """A copy of `schema` in which every object that lists its properties allows no others.

    JSON Schema allows undeclared properties unless told otherwise, and under a grammar a
    small model will happily invent them until max_tokens. Tool arguments and response
    formats rarely mean that, so the server closes them (an explicit additionalProperties,
    true or a schema, is kept).
    """
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_objects(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _json_grammar(schema: dict[str, Any] | bool) -> str:
    schema = dict(schema) if isinstance(schema, dict) else schema
    if isinstance(schema, dict):
        # The layout is the server's choice; a schema's own x-guidance options still win.
        schema["x-guidance"] = {**JSON_LAYOUT, **schema.get("x-guidance", {})}
    return json.dumps({"grammars": [{"json_schema": schema}]})


def _lark_regex_body(regex: str) -> str:
    # A Lark /.../ literal ends at the first unescaped slash; escape the pattern's own.
    out, escaped = [], False
    for c in regex:
        if c == "/" and not escaped:
            out.append("\\/")
        else:
            out.append(c)
        escaped = c == "\\" and not escaped
    return "".join(out)
