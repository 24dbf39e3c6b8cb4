"""What a benchmark sends: a fixed, seeded list of requests.

Two sources. Synthetic prompts are random sequences of common English words,
about one token each in the usual BPE vocabularies (exact when a tokenizer is
given, which trims them to the drawn length). Datasets are JSONL (or a JSON
array) of records in one of three shapes:

    {"prompt": "..."}                                  plain text ("text" also works)
    {"messages": [{"role": "user", "content": "..."}]}  OpenAI chat
    {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}]}
                                                      ShareGPT; the prompt is the
                                                      conversation up to its first
                                                      human turn

A record may carry "max_tokens" to fix its reply length; otherwise the output
DIST decides. The same seed always yields the same requests in the same order.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfhost.bench.dist import LengthDist
from selfhost.bench.tokens import TokenCounter
from selfhost.errors import InvalidParameterError, SelfhostError


class DatasetError(SelfhostError):
    """A prompts file that is missing, unreadable or holds no usable record."""


# Short, frequent words: each is a single token (with its leading space) in the
# GPT-2, Llama and Qwen vocabularies, so word count approximates token count.
_WORDS = (
    "the of and to in is for on that with as by at from this be are was it an or "
    "have not but all can more one new will about time year people day man way "
    "world life work part place case week point group number system program "
    "question government company fact hand home water room mother area money story "
    "month lot right study book eye job word business issue side kind head house "
    "service friend father power hour game line end member law car city community "
    "name president team minute idea body information back parent face others level "
    "office door health person art war history party result change morning reason "
    "research girl guy moment air teacher force education light small large long "
    "great little own other old big high different early young important few public "
    "bad same able open short sure free true full real best better clear whole "
    "make go know take see come think look want give use find tell ask seem feel "
    "try leave call keep let begin show hear play run move live hold bring write "
    "stand learn meet pay sit speak read grow"
).split()

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload. `messages` are (role, content) pairs; a plain
    prompt is a single user message. `planned_prompt_tokens` is the drawn length
    for synthetic prompts, None for dataset prompts."""

    index: int
    messages: tuple[tuple[str, str], ...]
    max_tokens: int
    planned_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InvalidParameterError(f"request {self.index}: max_tokens={self.max_tokens} must be >= 1")
        if not self.messages:
            raise InvalidParameterError(f"request {self.index} has no messages")

    def chat_messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]

    def prompt_text(self) -> str:
        """The prompt for `/v1/completions`: a lone user message as-is, a
        conversation as `role: content` lines ending with an open assistant turn."""
        if len(self.messages) == 1 and self.messages[0][0] == "user":
            return self.messages[0][1]
        lines = [f"{role}: {content}" for role, content in self.messages]
        return "\n".join(lines) + "\nassistant:"


@dataclass(frozen=True)
class Workload:
    """The requests of a run and how they were made (for reports and tracking)."""

    source: str  # "synthetic" or the dataset path
    prompt_tokens: str | None  # DIST string for synthetic prompts
    output_tokens: str  # DIST string
    seed: int
    requests: tuple[BenchRequest, ...]

    def describe(self) -> str:
        prompt = f"prompt={self.prompt_tokens}" if self.prompt_tokens else f"dataset={self.source}"
        return f"{prompt} output={self.output_tokens} n={len(self.requests)} seed={self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "num_requests": len(self.requests),
            "seed": self.seed,
        }


def _check_count(num_requests: int) -> None:
    if num_requests < 1:
        raise InvalidParameterError(f"--requests {num_requests} must be >= 1")


def _synthetic_prompt(rng: random.Random, num_tokens: int, counter: TokenCounter | None) -> str:
    words = [rng.choice(_WORDS) for _ in range(num_tokens)]
    if counter is None:
        return " ".join(words)
    text = " ".join(words)
    # Some words split into two tokens under some vocabularies; top up, then cut.
    while counter.count(text) < num_tokens:
        text += " " + " ".join(rng.choice(_WORDS) for _ in range(num_tokens))
    return counter.truncate(text, num_tokens)


def synthetic_workload(
    num_requests: int,
    prompt_dist: LengthDist,
    output_dist: LengthDist,
    seed: int = 0,
    counter: TokenCounter | None = None,
) -> Workload:
    _check_count(num_requests)
    rng = random.Random(seed)
    requests = []
    for index in range(num_requests):
        prompt_len = prompt_dist.sample(rng)
        output_len = output_dist.sample(rng)
        prompt = _synthetic_prompt(rng, prompt_len, counter)
        requests.append(BenchRequest(index, (("user", prompt),), output_len, prompt_len))
    return Workload("synthetic", str(prompt_dist), str(output_dist), seed, tuple(requests))


def _messages_from_plain(record: dict) -> list[tuple[str, str]]:
    text = record.get("prompt", record.get("text"))
    return [("user", text)] if isinstance(text, str) and text.strip() else []


def _messages_from_openai(record: dict) -> list[tuple[str, str]]:
    out = []
    for message in record["messages"]:
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            out.append((str(message.get("role", "user")), message["content"]))
    return out


def _messages_from_sharegpt(record: dict) -> list[tuple[str, str]]:
    out = []
    for turn in record["conversations"]:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            continue
        role = _SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            continue
        out.append((role, turn["value"]))
        if role == "user":
            break
    return out if out and out[-1][0] == "user" else []


# Record shape, recognised by its distinguishing key, -> reader.
_RECORD_READERS = {
    "conversations": _messages_from_sharegpt,
    "messages": _messages_from_openai,
    "prompt": _messages_from_plain,
    "text": _messages_from_plain,
}


def _read_records(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise DatasetError(f"cannot read dataset {str(path)!r}: {err.strerror}") from None
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise DatasetError(f"dataset {str(path)!r} is not valid JSON: {err}") from None
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DatasetError(f"dataset {str(path)!r} line {line_no} is not JSON: {err.msg}") from None
    return records


def _record_messages(record: Any) -> list[tuple[str, str]]:
    if not isinstance(record, dict):
        return []
    for key, reader in _RECORD_READERS.items():
        if key in record:
            return reader(record)
    return []


def dataset_workload(path: str | Path, num_requests: int, output_dist: LengthDist, seed: int = 0) -> Workload:
    """Requests from a prompts file: records are shuffled with `seed` and reused
    cyclically when `num_requests` exceeds their number."""
    _check_count(num_requests)
    path = Path(path)
    usable = []
    for record in _read_records(path):
        messages = _record_messages(record)
        if messages:
            fixed = record.get("max_tokens")
            usable.append((tuple(messages), fixed if isinstance(fixed, int) and fixed > 0 else None))
    if not usable:
        raise DatasetError(
            f"dataset {str(path)!r} has no usable record; expected keys {sorted(_RECORD_READERS)} (see docs/BENCH.md)"
        )
    rng = random.Random(seed)
    rng.shuffle(usable)
    requests = []
    for index in range(num_requests):
        messages, fixed = usable[index % len(usable)]
        output_len = output_dist.sample(rng)  # drawn always, so lengths do not shift with `fixed`
        requests.append(BenchRequest(index, messages, fixed or output_len))
    return Workload(str(path), None, str(output_dist), seed, tuple(requests))
