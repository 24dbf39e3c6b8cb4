"""What a relayed stream delivered: the upstream's usage chunk, or the gateway's own count.

A stream asked with `include_usage` ends with a chunk whose `choices` is empty and
whose `usage` is exact. A stream cut short has none: it is charged for the tokens the
client received (one per content-bearing chunk, as OpenAI-compatible servers send a
token per chunk) and for its prompt, estimated at four characters a token; the ledger
marks such rows `usage_estimated`.

Only a chunk that may carry a usage object is parsed as it passes (one with a `"usage":`
key whose value is not null); the rest are kept as they are and parsed, to count the
content-bearing ones, only if the stream ends without usage, or a batch at a time once
PARSE_BATCH of them wait. Most streams end with their usage chunk and are never parsed:
parsing every chunk cost the gateway more than relaying it.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re

from selfhost.gateway import wire_json
from selfhost.gateway.rate_card import Pricer
from selfhost.gateway.usage import PricedUsage, price, usage_record
from selfhost.plan.pricing import UsageRecord

CHARS_PER_TOKEN = 4  # a rough English average; only for streams that ended without usage
PARSE_BATCH = 512  # unparsed chunks held per stream at most (~100 KB)
# A `"usage":` key not followed by null. Inside a JSON string a quote is escaped, so this can only be a key
# (a string value never has a colon after it); a false match costs one parse, never a wrong count.
_USAGE_KEY = re.compile(r'"usage"\s*+:\s*+(?!null)')  # possessive: no backtracking to a space before null
_USAGE_KEY_BYTES = re.compile(rb'"usage"\s*+:\s*+(?!null)')


class StreamTally:
    def __init__(self, payload: dict):
        self.payload = payload
        self.usage: UsageRecord | None = None
        self._content_chunks = 0  # among the parsed chunks
        self._unparsed: list[str | bytes] = []

    @property
    def content_chunks(self) -> int:
        """Chunks that carried tokens to the client."""
        self._count_unparsed()
        return self._content_chunks

    def observe(self, data: str | bytes) -> dict | None:
        """Count one `data:` payload; returns it parsed when it may carry usage (None when it was not parsed, or
        is not a JSON object)."""
        usage_key = _USAGE_KEY_BYTES if isinstance(data, bytes) else _USAGE_KEY
        if usage_key.search(data) is None:
            self._unparsed.append(data)
            if len(self._unparsed) >= PARSE_BATCH:
                self._count_unparsed()
            return None
        chunk = self._count(data)
        if chunk is not None and chunk.get("usage"):
            self.usage = usage_record(chunk["usage"]) or self.usage
        return chunk

    @staticmethod
    def is_usage_only(chunk: dict | None) -> bool:
        return chunk is not None and chunk.get("usage") is not None and not chunk.get("choices")

    def usage_or_estimate(self) -> tuple[UsageRecord, bool]:
        """(usage, whether it is the gateway's estimate)."""
        if self.usage is not None:
            self._unparsed.clear()
            return self.usage, False
        prompt = self.payload.get("messages", self.payload.get("prompt", ""))
        prompt_tokens = math.ceil(len(json.dumps(prompt)) / CHARS_PER_TOKEN)
        return UsageRecord(input_tokens=prompt_tokens, output_tokens=self.content_chunks), True

    def priced(self, pricer: Pricer, when: dt.datetime) -> PricedUsage:
        usage, estimated = self.usage_or_estimate()
        return price(usage, pricer, when, estimated)

    def priced_by(self, rate) -> PricedUsage:
        """Priced by a local model's rate (local_meter.LocalRate)."""
        return rate.price(*self.usage_or_estimate())


    def _count_unparsed(self) -> None:
        for data in self._unparsed:
            self._count(data)
        self._unparsed.clear()

    def _count(self, data: str | bytes) -> dict | None:
        try:
            chunk = wire_json.loads(data)
        except ValueError:
            return None
        if not isinstance(chunk, dict):
            return None
        for choice in chunk.get("choices") or ():
            if isinstance(choice, dict) and _carries_tokens(choice):
                self._content_chunks += 1
        return chunk


def _carries_tokens(choice: dict) -> bool:
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return bool(delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"))
    return bool(choice.get("text"))
