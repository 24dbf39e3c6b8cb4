"""Server-sent events survive any generated text, whatever line splitter the client uses."""

import json

import httpx

from selfhost.server.serving import sse


def test_generated_line_separators_cannot_cut_an_event():
    text = "a\u2028b\x85c\u2029d\nE\r"
    event = sse(json.dumps({"choices": [{"text": text}]}, ensure_ascii=False))
    # str.splitlines (and httpx's iter_lines, which follows it) ends lines at NEL and the Unicode separators.
    lines = [line for line in event.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("data: ")
    assert json.loads(lines[0][len("data: "):])["choices"][0]["text"] == text
    response = httpx.Response(200, content=(event + sse("[DONE]")).encode())
    assert [line for line in response.iter_lines() if line] == [lines[0], "data: [DONE]"]
