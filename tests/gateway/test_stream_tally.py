"""What a relayed stream is charged: the upstream's usage chunk, else one token per content-bearing chunk."""

from __future__ import annotations

import json

from selfhost.gateway.stream_tally import PARSE_BATCH, StreamTally

USAGE = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}


def chunk(content: str | None = None, finish: str | None = None, **extra) -> bytes:
    delta = {} if content is None else {"content": content}
    return json.dumps({"object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}).encode()


def test_the_usage_chunk_is_exact_and_recognised_with_or_without_spaces():
    for usage_chunk in (json.dumps({"choices": [], "usage": USAGE}), json.dumps({"choices": [], "usage": USAGE},
                                                                                 separators=(",", ":"))):
        tally = StreamTally({"messages": []})
        for data in (chunk(""), chunk("Hi"), chunk(finish="stop")):
            assert not tally.is_usage_only(tally.observe(data))
        parsed = tally.observe(usage_chunk.encode())
        assert tally.is_usage_only(parsed)
        usage, estimated = tally.usage_or_estimate()
        assert (usage.input_tokens, usage.output_tokens, estimated) == (9, 4, False)


def test_null_usage_on_every_chunk_is_not_a_usage_chunk():
    tally = StreamTally({"messages": []})
    for data in (chunk("a", usage=None), chunk("b", usage=None)):
        assert not tally.is_usage_only(tally.observe(data))
    raw = b'{"choices":[{"index":0,"delta":{"content":"c"}}],"usage": null}'
    assert not tally.is_usage_only(tally.observe(raw))
    assert tally.usage_or_estimate()[0].output_tokens == 3


def test_a_stream_cut_short_counts_content_chunks_past_a_parse_batch():
    tally = StreamTally({"messages": [{"role": "user", "content": "x" * 40}]})
    tally.observe(chunk(""))  # the role chunk carries no token
    for i in range(PARSE_BATCH + 37):
        tally.observe(chunk(f"t{i}"))
    tally.observe(chunk('say "usage": 5'))  # the word inside content text is content, not usage
    usage, estimated = tally.usage_or_estimate()
    assert estimated and usage.output_tokens == PARSE_BATCH + 38 and usage.input_tokens > 0


def test_text_payloads_count_too():
    tally = StreamTally({"prompt": "hi"})
    for data in ('{"choices":[{"text":"a"}]}', '{"choices":[{"text":""}]}', "not json"):
        tally.observe(data)
    usage, estimated = tally.usage_or_estimate()
    assert estimated and usage.output_tokens == 1
