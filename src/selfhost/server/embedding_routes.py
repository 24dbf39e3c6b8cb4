"""POST /v1/embeddings (OpenAI-compatible). Logic lives in embedding_serving."""

from __future__ import annotations

from fastapi import APIRouter, Request

from selfhost.server.embedding_protocol import EmbeddingRequest, EmbeddingResponse
from selfhost.server.embedding_serving import create_embeddings
from selfhost.server.errors import OpenAIErrorBody, documented_errors

router = APIRouter(prefix="/v1", tags=["openai"], responses=documented_errors(OpenAIErrorBody))


@router.post("/embeddings", response_model=EmbeddingResponse)
async def embeddings(req: EmbeddingRequest, request: Request) -> EmbeddingResponse:
    state = request.app.state
    return await create_embeddings(state.embedding_models, state.models.names(), req)
