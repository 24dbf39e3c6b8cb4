"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models. Logic lives in serving."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from selfhost.server import openai_serving as oai, rag_serving
from selfhost.server.errors import APIError, OpenAIErrorBody, documented_errors
from selfhost.server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from selfhost.server.serving import Serving, event_stream, sse_error, unless_disconnected

router = APIRouter(prefix="/v1", tags=["openai"], responses=documented_errors(OpenAIErrorBody))

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _serving(request: Request) -> Serving:
    return request.app.state.serving


def _sse_response(request: Request, events) -> StreamingResponse:
    return StreamingResponse(event_stream(request, events, sse_error), media_type="text/event-stream",
                             headers=SSE_HEADERS)


@router.post("/chat/completions", response_model=oai.ChatCompletionResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
async def chat_completions(req: ChatCompletionRequest, request: Request):
    serving = _serving(request)
    if req.rag is not None:  # answer from a collection; the response adds `sources`
        grounded = await rag_serving.ground(serving, request.app.state.collections, req)
        if req.stream:
            return _sse_response(request, rag_serving.chat_completion_stream(serving, req, grounded))
        return JSONResponse(await unless_disconnected(request, rag_serving.chat_completion(serving, req, grounded)))
    served = await serving.model(req.model)
    gen = await oai.prepare_chat(serving, served, req, req.message_dicts())
    if req.stream:
        return _sse_response(request, oai.chat_completion_stream(serving, req, gen))
    return await unless_disconnected(request, oai.chat_completion(serving, req, gen))


@router.post("/completions", response_model=oai.CompletionResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
async def completions(req: CompletionRequest, request: Request):
    serving = _serving(request)
    served = await serving.model(req.model)
    prompts = [await serving.tokenize(served, p) for p in req.prompts()]
    gen = await serving.prepare(
        served, prompts, req.requested_max_tokens,
        lambda max_tokens, i: req.sampling_params(max_tokens, req.logprobs, i, req.num_prompt_logprobs), n=req.n,
    )
    if req.stream:
        return _sse_response(request, oai.completion_stream(serving, req, gen))
    return await unless_disconnected(request, oai.completion(serving, req, gen))


def _card(served) -> ModelCard:
    return ModelCard(id=served.name, created=int(served.loaded_at), max_model_len=served.llm.max_model_len,
                     parent=served.parent)


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_card(m) for m in request.app.state.models.models.values()])


@router.get("/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, request: Request) -> ModelCard:
    served = request.app.state.models.models.get(model_id)
    if served is None:
        raise APIError(f"model {model_id!r} is not loaded", 404, param="model", code="model_not_found")
    return _card(served)
