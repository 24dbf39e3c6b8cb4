"""ModelTools: one model's tool-call format, bound to its tokenizer.

Made once per served model: it detects the format from the chat template, finds
which call markers are single tokens of the vocabulary (those are matched as tokens
in grammars), renders conversations with tools, and decodes outputs with their
special tokens kept, which is what the parser reads.
"""

from __future__ import annotations

from functools import partial

from selfhost.errors import InvalidParameterError
from selfhost.structured_output import StructuredOutput
from selfhost.tokenizer import Tokenizer
from selfhost.tools.calls import ToolCall, ToolChoice, ToolSpec, new_call_id
from selfhost.tools.formats import ToolCallFormat, detect_format
from selfhost.tools.messages import Message, template_inputs
from selfhost.tools.parse import ParsedOutput, PartialCall, ToolCallStream, parse_tool_calls


class ModelTools:
    def __init__(self, tokenizer: Tokenizer, fmt: ToolCallFormat | None = None):
        self.tokenizer = tokenizer
        self.format = fmt or detect_format(tokenizer.hf.chat_template)
        vocab = tokenizer.hf.get_vocab()
        self.markers = {m: vocab[m] for m in (self.format.opener, self.format.closer) if m and m in vocab}
        self.new_id = partial(new_call_id, self.format.call_id_length)

    def encode_chat(self, messages: list[Message], tools: list[ToolSpec]) -> list[int]:
        rendered, variables = template_inputs(messages, tools, self.format)
        try:
            return self.tokenizer.encode_chat(rendered, **variables)
        except InvalidParameterError:
            # Some templates (Gemma 2) refuse a system turn, where the prompted format puts the tools:
            # it goes to the front of the first user turn instead.
            if len(rendered) < 2 or rendered[0]["role"] != "system" or rendered[1]["role"] != "user":
                raise
            system, first, *rest = rendered
            merged = {**first, "content": f"{system['content']}\n\n{first['content']}"}
            return self.tokenizer.encode_chat([merged, *rest], **variables)

    def constraint(self, tools: list[ToolSpec], choice: ToolChoice, parallel: bool = True) -> StructuredOutput | None:
        return self.format.constraint(tools, choice, parallel, self.markers)

    def output_text(self, token_ids: list[int]) -> str:
        """The output as the parser reads it: special tokens kept, the final end-of-turn token dropped."""
        ids = list(token_ids)
        while ids and ids[-1] in self.tokenizer.eos_token_ids:
            ids.pop()
        return self.tokenizer.hf.decode(ids, skip_special_tokens=False)

    def parse(self, token_ids: list[int]) -> ParsedOutput:
        return parse_tool_calls(self.output_text(token_ids), self.format, self.new_id)

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self.format, self.new_id)


class OutputSplitter:
    """One choice's output, delta by delta, as (text to send now, tool calls): every API streams this way.

    Text goes out as soon as it cannot be part of a call; the calls come with the last delta. The
    parser reads the output decoded with special tokens (a call marker may be one), so the token
    ids are kept. Without tools (`tools` None) the text passes straight through.
    """

    def __init__(self, tools: ModelTools | None):
        self.tools, self.token_ids = tools, []
        self.parser = tools.stream() if tools is not None else None

    def feed(self, delta) -> tuple[str, list[ToolCall]]:
        if self.parser is None:
            return delta.text, []
        self.token_ids += delta.token_ids
        text = self.parser.update(self.tools.output_text(self.token_ids))
        if not delta.is_finished:
            return text, []
        rest, calls = self.parser.finish()
        return text + rest, calls

    def partial_calls(self) -> list[tuple[str, PartialCall]]:
        """(id, call so far) for the calls the output has begun: for streams that send arguments as written."""
        return self.parser.partial_calls() if self.parser is not None else []


def calls_as_openai(calls: list[ToolCall]) -> list[dict]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
