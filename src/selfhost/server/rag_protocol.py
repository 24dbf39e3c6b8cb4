"""Wire models of selfhost's RAG extension to chat completions.

A chat request may carry `"rag": {"collection": "docs", "top_k": 5}` (with the
`openai` client: `extra_body={"rag": {...}}`). The server then answers the last
user message from that collection and the response carries the `sources` the
model was shown, numbered as the answer cites them ([1], [2] ...). Requests
without the field are plain OpenAI chat completions.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MAX_TOP_K = 50  # more sources than this would not fit a small model's context anyway


class RagOptions(BaseModel):
    # Our own extension, so a misspelt option is an error rather than silently ignored.
    model_config = ConfigDict(extra="forbid")

    collection: str = Field(min_length=1, description="Collection to answer from (see `selfhost rag list`).")
    top_k: int = Field(5, ge=1, le=MAX_TOP_K, description="Chunks to retrieve (hybrid dense + BM25).")
    min_score: float | None = Field(
        None, ge=-1, le=1, description="Cosine below which a chunk is not relevant [default: 0.25]."
    )
    path: str | None = Field(
        None, min_length=1, pattern=r"^[^\x00]*$", description="Only search this file or folder (server-side path)."
    )


class SourceInfo(BaseModel):
    number: int  # the [n] the prompt and the answer use, from 1
    path: str
    chunk_index: int
    score: float  # the hybrid (reciprocal-rank) score that ranked it
    similarity: float  # cosine between the question and the chunk
    text: str
