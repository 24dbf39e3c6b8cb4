"""Answer a question from retrieved chunks, with numbered sources the answer cites.

When no retrieved chunk is similar enough to the question, no model is called:
the answer says that the collection has nothing on it. A small model given
unrelated context tends to answer anyway, which is the failure RAG is for.

Generation is a plain callable from chat messages to text, so a selfhost model,
any OpenAI-compatible endpoint, or a test double all plug in the same way. When
the model's window is known (a local model), the sources are fitted into it
first (rag/fit.py), and the answer notes what was dropped or cut.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from selfhost.errors import InvalidParameterError, SelfhostError
from selfhost.rag.fit import PromptBudget, fit_sources
from selfhost.rag.retrieve import Hit, Retriever

Generate = Callable[[list[dict]], str]

# For all-MiniLM-L6-v2, unrelated text scores roughly -0.1..0.2 and on-topic text
# 0.3 and up; other models may need a different --min-score.
DEFAULT_MIN_SIMILARITY = 0.25

SYSTEM_PROMPT = (
    "You answer questions using only the numbered sources the user gives you. "
    "Cite the sources you use in square brackets, like [1] or [2][3]. "
    "If the sources do not contain the answer, say that you do not know; do not guess."
)

_CITATION = re.compile(r"\[(\d+)\]")


@dataclass(frozen=True)
class Source:
    number: int  # the [n] the prompt and answer use, from 1
    path: str
    chunk_index: int
    text: str
    similarity: float
    score: float  # the retrieval (hybrid) score that ranked it


@dataclass(frozen=True)
class Answer:
    text: str
    sources: list[Source]  # what the model was shown, in [n] order; empty when nothing was relevant
    cited: list[int]  # source numbers the answer actually cites, in first-mention order
    note: str | None = None  # what was dropped or cut to fit the model's context, if anything

    @property
    def is_grounded(self) -> bool:
        return bool(self.sources)


def build_messages(question: str, sources: list[Source]) -> list[dict]:
    blocks = [f"[{s.number}] (from {s.path}, chunk {s.chunk_index})\n{s.text}" for s in sources]
    user = "Sources:\n\n" + "\n\n".join(blocks) + f"\n\nQuestion: {question}\nAnswer with citations:"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def ground_conversation(messages: list[dict], sources: list[Source]) -> list[dict]:
    """A client's chat made grounded: the last user turn carries the sources, the system turn the rules.

    The client's own system text follows the grounding rules in the one system
    message (many chat templates accept only one, first); earlier turns stay as sent.
    """
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    grounded_system, grounded_user = build_messages(messages[last_user]["content"], sources)
    client_system = [m["content"] for m in messages if m["role"] == "system" and m["content"]]
    system = {"role": "system", "content": "\n\n".join([grounded_system["content"], *client_system])}
    turns = [grounded_user if i == last_user else m for i, m in enumerate(messages) if m["role"] != "system"]
    return [system, *turns]


def relevant_sources(hits: list[Hit], min_similarity: float = DEFAULT_MIN_SIMILARITY) -> list[Source]:
    """Hits at least `min_similarity` to the question, numbered from 1 in rank order."""
    relevant = [h for h in hits if h.similarity >= min_similarity]
    return [
        Source(i, h.chunk.path, h.chunk.chunk_index, h.chunk.text, h.similarity, h.score)
        for i, h in enumerate(relevant, start=1)
    ]


def nothing_relevant(collection: str) -> str:
    return f"I found nothing relevant to this question in collection {collection!r}, so I will not answer it."


def cited_numbers(text: str, num_sources: int) -> list[int]:
    seen: list[int] = []
    for match in _CITATION.finditer(text):
        number = int(match.group(1))
        if 1 <= number <= num_sources and number not in seen:
            seen.append(number)
    return seen


def answer_question(
    question: str,
    retriever: Retriever,
    generate: Generate,
    k: int = 5,
    min_similarity: float = DEFAULT_MIN_SIMILARITY,
    path: str | None = None,
    budget: Callable[[], PromptBudget] | None = None,
) -> Answer:
    """Retrieve, keep hits at least `min_similarity` to the question, and generate from them.

    With `budget` (the generating model's window and token counter, asked for only
    when there is something to generate from), the sources are fitted into the window.
    """
    if not question.strip():
        raise InvalidParameterError("question is empty")
    hits: list[Hit] = retriever.search(question, k=k, mode="hybrid", path=path)
    sources = relevant_sources(hits, min_similarity)
    if not sources:
        return Answer(text=nothing_relevant(retriever.collection), sources=[], cited=[])
    note = None
    if budget is not None:
        window = budget()
        fitted = fit_sources(sources, lambda kept: window.count_tokens(build_messages(question, kept)),
                             window.context_tokens, window.max_tokens)
        sources, note = fitted.sources, fitted.note()
    text = generate(build_messages(question, sources)).strip()
    return Answer(text=text, sources=sources, cited=cited_numbers(text, len(sources)), note=note)


class LocalGenerator:
    """Generate with a selfhost model in this process; the model loads on first use.

    An answer never runs past the window: the engine stops it there, so
    `budget()` is what lets the prompt leave it room.
    """

    def __init__(self, model: str | None, max_tokens: int = 256):
        self.model = model  # None: the embedded demo model
        self.max_tokens = max_tokens
        self._llm = None

    @property
    def llm(self):
        if self._llm is None:
            try:
                from selfhost import LLM
            except ImportError as err:
                raise SelfhostError(
                    "local generation needs selfhost's LLM API, which this install lacks; "
                    "pass --url http://HOST/v1 to use an OpenAI-compatible server instead"
                ) from err
            self._llm = LLM(self.model)
        return self._llm

    def budget(self) -> PromptBudget:
        tokenizer = self.llm.tokenizer
        return PromptBudget(self.llm.max_model_len, self.max_tokens, lambda m: len(tokenizer.encode_chat(m)))

    def __call__(self, messages: list[dict]) -> str:
        from selfhost import SamplingParams

        return self.llm.chat(messages, SamplingParams(max_tokens=self.max_tokens, temperature=0.0))[0].text


def local_generator(model: str | None, max_tokens: int = 256) -> LocalGenerator:
    """Generate with a selfhost model in this process (the default model when `model` is None)."""
    return LocalGenerator(model, max_tokens)


def http_generator(url: str, model: str | None = None, api_key: str | None = None, max_tokens: int = 256) -> Generate:
    """Generate with any OpenAI-compatible chat endpoint at `url` (ending in /v1)."""
    import httpx

    base = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def generate(messages: list[dict]) -> str:
        body = {"model": model or "default", "messages": messages, "max_tokens": max_tokens, "temperature": 0.0}
        try:
            response = httpx.post(f"{base}/chat/completions", json=body, headers=headers, timeout=300.0)
        except httpx.HTTPError as err:
            raise SelfhostError(f"cannot reach chat endpoint {base}/chat/completions: {err}") from err
        if response.status_code != 200:
            raise SelfhostError(
                f"chat endpoint {base} answered {response.status_code}: {response.text[:200]}"
            )
        return response.json()["choices"][0]["message"]["content"] or ""

    return generate
