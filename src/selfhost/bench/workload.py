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

Each load level gets its own request set with the same lengths but different
prompts (synthetic: other words; datasets: the next records), so a server's
prefix cache cannot serve a later level from an earlier one.
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


# Short, frequent English words. Large BPE vocabularies (GPT-2, Llama 3, Qwen)
# usually hold each as one token with its leading space, so word count
# approximates token count; --tokenizer makes lengths exact.
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


def warmup_request(like: BenchRequest) -> BenchRequest:
    """A request of `like`'s size with its words reversed: it exercises the same
    prompt and reply lengths without putting `like`'s prompt in a prefix cache."""
    messages = tuple((role, " ".join(reversed(content.split()))) for role, content in like.messages)
    return BenchRequest(-1, messages, like.max_tokens, like.planned_prompt_tokens)


@dataclass(frozen=True)
class Workload:
    """The requests of a run, one set per load level, and how they were made."""

    source: str  # "synthetic" or the dataset path
    prompt_tokens: str | None  # DIST string for synthetic prompts
    output_tokens: str  # DIST string
    seed: int
    per_level: tuple[tuple[BenchRequest, ...], ...]

    def __post_init__(self) -> None:
        assert self.per_level and len({len(requests) for requests in self.per_level}) == 1, "ragged levels"

    @property
    def requests(self) -> tuple[BenchRequest, ...]:
        """The first level's requests (every level has as many, of the same lengths)."""
        return self.per_level[0]

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


def _check_counts(num_requests: int, num_levels: int) -> None:
    if num_requests < 1:
        raise InvalidParameterError(f"--requests {num_requests} must be >= 1")
    assert num_levels >= 1, num_levels


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
    num_levels: int = 1,
) -> Workload:
    _check_counts(num_requests, num_levels)
    rng = random.Random(seed)
    lengths = [(prompt_dist.sample(rng), output_dist.sample(rng)) for _ in range(num_requests)]
    per_level = []
    for level in range(num_levels):
        words_rng = random.Random(f"{seed}/level{level}")  # str seeds are stable across processes
        per_level.append(tuple(
            BenchRequest(index, (("user", _synthetic_prompt(words_rng, prompt_len, counter)),), output_len, prompt_len)
            for index, (prompt_len, output_len) in enumerate(lengths)
        ))
    return Workload("synthetic", str(prompt_dist), str(output_dist), seed, tuple(per_level))


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


def dataset_workload(
    path: str | Path, num_requests: int, output_dist: LengthDist, seed: int = 0, num_levels: int = 1
) -> Workload:
    """Requests from a prompts file. Records are shuffled with `seed`; level i
    takes the i-th run of `num_requests` records, wrapping around (so levels
    share prompts only when the file is smaller than requests x levels)."""
    _check_counts(num_requests, num_levels)
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
    output_lens = [output_dist.sample(rng) for _ in range(num_requests)]
    per_level = []
    for level in range(num_levels):
        requests = []
        for index, output_len in enumerate(output_lens):
            messages, fixed = usable[(level * num_requests + index) % len(usable)]
            requests.append(BenchRequest(index, messages, fixed or output_len))
        per_level.append(tuple(requests))
    return Workload(str(path), None, str(output_dist), seed, tuple(per_level))
