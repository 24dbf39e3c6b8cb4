"""Fine-tuning examples: token ids and which of them carry loss.

Three shapes of data, told apart by their fields, one JSON object a line:
- `{"messages": [{"role": ..., "content": ...}, ...]}`: rendered with the
  model's chat template; only the assistant turns (their text and the
  template's end-of-turn marks after it) carry loss;
- `{"prompt": ..., "completion": ...}`: loss on the completion and the EOS;
- `{"text": ...}`: loss on every token.
A file that is not `.jsonl`/`.json` is plain UTF-8 text, cut into windows.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from selfhost.errors import SelfhostError
from selfhost.tokenizer import Tokenizer


class DataError(SelfhostError):
    """A training or evaluation file selfhost cannot use; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    token_ids: list[int]
    loss_mask: list[bool]  # loss_mask[i]: token i is a prediction target that counts

    @property
    def num_loss_tokens(self) -> int:
        return sum(self.loss_mask[1:])  # the first token is never predicted


def chat_example(tok: Tokenizer, messages: list[dict]) -> Example:
    """The rendered conversation; assistant turns, and only they, carry loss.

    An assistant turn starts where the conversation before it, rendered with the
    template's generation prompt, ends: what follows is what the model writes.
    It ends after its content and the end-of-turn marks the template puts after
    it (the tokens the conversation and the one rendered through this turn agree
    on). Templates may render the final turn differently (Qwen 3's empty think
    block, Phi-4's trailing EOS), so the rendering through the turn is only used
    for those marks. Tokens are marked by their character offsets.
    """
    text = tok.render_chat(messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        content = message.get("content")
        if not isinstance(content, str):
            raise DataError(f"messages[{i}]: an assistant turn's content must be a string")
        before = tok.render_chat(messages[:i], add_generation_prompt=True) if i else ""
        found = text.find(content, len(before))
        if not text.startswith(before) or found < 0:
            raise DataError(f"messages[{i}]: the chat template does not render the conversation before this "
                            "assistant turn as a prefix of the whole, so its tokens cannot be located")
        through = tok.render_chat(messages[: i + 1], add_generation_prompt=False)
        end = found + len(content)
        after_here = tok.hf.encode(text[end:], add_special_tokens=False)
        after_alone = tok.hf.encode(through[through.rfind(content) + len(content):], add_special_tokens=False)
        spans.append((len(before), end, len(os.path.commonprefix([after_here, after_alone]))))
    encoded = tok.hf(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = [start for start, _ in encoded["offset_mapping"]]
    mask = [False] * len(starts)
    for start, end, num_marks in spans:
        inside = [t for t, s in enumerate(starts) if start <= s < end]
        first_mark = next((t for t, s in enumerate(starts) if s >= end), len(starts))
        for t in [*inside, *range(first_mark, min(first_mark + num_marks, len(starts)))]:
            mask[t] = True
    return Example(list(encoded["input_ids"]), mask)


def prompt_completion_example(tok: Tokenizer, prompt: str, completion: str) -> Example:
    prompt_ids = tok.encode(prompt)
    completion_ids = tok.hf.encode(completion, add_special_tokens=False) + [_eos_id(tok)]
    return Example(prompt_ids + completion_ids, [False] * len(prompt_ids) + [True] * len(completion_ids))


def text_example(tok: Tokenizer, text: str) -> Example:
    ids = tok.encode(text) + [_eos_id(tok)]
    return Example(ids, [True] * len(ids))


def _eos_id(tok: Tokenizer) -> int:
    if tok.hf.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token to end completions with")
    return tok.hf.eos_token_id


def _from_record(tok: Tokenizer, record: object) -> Example:
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise DataError("'messages' must be a list of {role, content} objects")
        if not any(m.get("role") == "assistant" for m in messages):
            raise DataError("the conversation has no assistant turn to learn from")
        return chat_example(tok, messages)
    if "prompt" in record and "completion" in record:
        if not isinstance(record["prompt"], str) or not isinstance(record["completion"], str):
            raise DataError("'prompt' and 'completion' must be strings")
        return prompt_completion_example(tok, record["prompt"], record["completion"])
    if isinstance(record.get("text"), str):
        return text_example(tok, record["text"])
    raise DataError(f"expected 'messages', 'prompt' and 'completion', or 'text'; got fields {sorted(record)}")


def load_examples(path: Path, tok: Tokenizer, max_len: int) -> list[Example]:
    """Every example of `path`, truncated to max_len tokens; raise naming the line of the first bad one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text: {err}") from None
    if not content.strip():
        raise DataError(f"data file {path} is empty")
    if path.suffix in (".jsonl", ".json"):
        examples = []
        for line_no, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                example = _from_record(tok, json.loads(line))
            except (json.JSONDecodeError, SelfhostError) as err:
                raise DataError(f"{path}, line {line_no}: {err}") from None
            examples.append(Example(example.token_ids[:max_len], example.loss_mask[:max_len]))
    else:
        ids = tok.encode(content)
        examples = [Example(ids[i:i + max_len], [True] * len(ids[i:i + max_len]))
                    for i in range(0, len(ids) - 1, max_len)]
    examples = [e for e in examples if e.num_loss_tokens > 0]
    if not examples:
        raise DataError(f"{path} has no example with a token to learn (after truncating to {max_len} tokens)")
    return examples
