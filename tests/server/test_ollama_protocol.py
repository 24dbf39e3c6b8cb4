"""Ollama wire models: text-only servers refuse images wherever a request can carry them."""

import pydantic
import pytest

from selfhost.server.ollama_protocol import OllamaChatRequest, OllamaGenerateRequest


@pytest.mark.parametrize(
    "cls,body",
    [
        (OllamaGenerateRequest, {"model": "m", "prompt": "x", "images": ["aGk="]}),
        (OllamaChatRequest, {"model": "m", "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}),
    ],
)
def test_images_are_refused_with_a_clear_message(cls, body):
    with pytest.raises(pydantic.ValidationError, match="images are not supported"):
        cls(**body)


def test_requests_without_images_are_accepted():
    assert OllamaGenerateRequest(model="m", prompt="x", images=[]).prompt == "x"
    assert OllamaChatRequest(model="m", messages=[{"role": "user", "content": "x"}]).messages[0].content == "x"
