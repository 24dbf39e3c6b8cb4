"""OpenAI wire models for POST /v1/embeddings.

`input` is one text, a list of texts, one list of token ids, or a list of them
(ids of the embedding model's own vocabulary, as vLLM accepts them). The limits
are checked here, so a bad request is a 400 before any model is touched.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, WithJsonSchema, model_validator

from selfhost.server.wire import Lenient
from selfhost.tokenizer import check_text

# OpenAI's own cap on inputs per request; keeps one request from holding the embedder for minutes.
MAX_EMBEDDING_INPUTS = 2048


# What `_check_input` enforces, published in the OpenAPI schema so generated clients agree (pydantic's
# own union errors would name its union members, not the field, so the check stays ours).
_NON_EMPTY_INPUT_SCHEMA = {"anyOf": [
    {"type": "string", "minLength": 1},
    {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
    {"type": "array", "minItems": 1, "items": {"type": "integer"}},
    {"type": "array", "minItems": 1, "items": {"type": "array", "minItems": 1, "items": {"type": "integer"}}},
], "title": "Input"}


class EmbeddingRequest(Lenient):
    model: str = Field(min_length=1)
    input: Annotated[str | list[str] | list[int] | list[list[int]], WithJsonSchema(_NON_EMPTY_INPUT_SCHEMA)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    @model_validator(mode="after")
    def _check_input(self):
        inputs = self.inputs()
        if not inputs:
            raise ValueError("input is an empty list; send at least one text")
        if len(inputs) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"input has {len(inputs)} items; at most {MAX_EMBEDDING_INPUTS} are accepted per request")
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                check_text(item, f"input[{i}]")
            if len(item) == 0:
                kind = "text" if isinstance(item, str) else "token list"
                raise ValueError(f"input[{i}] is an empty {kind}")
        return self

    def inputs(self) -> list[str] | list[list[int]]:
        """The input as a list: of texts, or of token-id lists."""
        value = self.input
        if isinstance(value, str):
            return [value]
        if value and all(isinstance(x, int) for x in value):
            return [list(value)]
        return list(value)

    @property
    def is_tokens(self) -> bool:
        inputs = self.inputs()
        return bool(inputs) and not isinstance(inputs[0], str)


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # a base64 string of little-endian float32 when encoding_format=base64


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage
