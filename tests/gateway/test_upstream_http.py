"""The upstream client's pieces: SSE lines cut only at CR/LF, and the proxy read once from the environment."""

from __future__ import annotations

import asyncio

from selfhost.gateway.upstream_http import proxy_for, sse_batches


async def _chunks(*parts: bytes):
    for part in parts:
        yield part


def batches_of(*parts: bytes) -> list[list[bytes]]:
    async def collect():
        return [batch async for batch in sse_batches(_chunks(*parts))]

    return asyncio.run(collect())


def data_of(*parts: bytes) -> list[bytes]:
    return [data for batch in batches_of(*parts) for data in batch]


def test_sse_payloads_survive_any_chunking_and_unicode_line_separators():
    text = '{"c":"a\u2028b\x85c\u2029"}'.encode()
    stream = b"data: " + text + b"\r\n\r\n: a comment\n\ndata:{\"d\":1}\n\ndata: [DONE]\n\n"
    whole = data_of(stream)
    assert whole == [text, b'{"d":1}', b"[DONE]"]
    for cut in range(1, len(stream)):  # CR and LF split across chunks included
        assert data_of(stream[:cut], stream[cut:]) == whole


def test_a_last_line_without_its_newline_still_counts():
    assert data_of(b"data: 1\n\ndata: 2") == [b"1", b"2"]


def test_the_events_of_one_read_come_together_and_a_read_with_none_yields_nothing():
    assert batches_of(b"data: 1\n\ndata: 2\n\nda", b"ta: 3", b"\n\n: comment\n\n", b"data: 4\n\n") == [
        [b"1", b"2"], [b"3"], [b"4"]]


def test_proxy_comes_from_the_environment_once_and_no_proxy_is_respected(monkeypatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://user:pw@proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    via = proxy_for("https://api.openai.com/v1")
    assert str(via["proxy"]) == "http://proxy.internal:3128" and via["proxy_auth"].login == "user"
    assert proxy_for("http://127.0.0.1:8000/v1") == {}
    monkeypatch.delenv("HTTPS_PROXY")
    assert proxy_for("https://api.openai.com/v1") == {}
