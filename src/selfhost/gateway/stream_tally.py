"""What a relayed stream delivered: the upstream's usage chunk, or the gateway's own count.

A stream asked with `include_usage` ends with a chunk whose `choices` is empty and
whose `usage` is exact. A stream cut short has none: it is charged for the tokens the
client received (one per content-bearing chunk, as OpenAI-compatible servers send a
token per chunk) and for its prompt, estimated at four characters a token; the ledger
marks such rows `usage_estimated`.
"""

from __future__ import annotations

import datetime as dt
import json
import math

from selfhost.gateway.rate_card import Pricer
from selfhost.gateway.usage import PricedUsage, price, usage_record
from selfhost.plan.pricing import UsageRecord

CHARS_PER_TOKEN = 4  # a rough English average; only for streams that ended without usage


class StreamTally:
    def __init__(self, payload: dict):
        self.payload = payload
        self.usage: UsageRecord | None = None
        self.content_chunks = 0

    def observe(self, data: str) -> dict | None:
        """Count one `data:` payload; returns it parsed (None when it is not a JSON object)."""
        try:
            chunk = json.loads(data)
        except ValueError:
            return None
        if not isinstance(chunk, dict):
            return None
        if chunk.get("usage"):
            self.usage = usage_record(chunk["usage"]) or self.usage
        for choice in chunk.get("choices") or ():
            if isinstance(choice, dict) and _carries_tokens(choice):
                self.content_chunks += 1
        return chunk

    @staticmethod
    def is_usage_only(chunk: dict | None) -> bool:
        return chunk is not None and chunk.get("usage") is not None and not chunk.get("choices")

    def usage_or_estimate(self) -> tuple[UsageRecord, bool]:
        """(usage, whether it is the gateway's estimate)."""
        if self.usage is not None:
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


def _carries_tokens(choice: dict) -> bool:
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return bool(delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"))
    return bool(choice.get("text"))
