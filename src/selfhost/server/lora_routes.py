"""LoRA adapters added and removed while serving: POST /v1/load_lora_adapter and /v1/unload_lora_adapter.

The request bodies are vLLM's (`lora_name`, `lora_path`), so scripts written for
vLLM's runtime adapter updates work here. Both routes need `--allow-load` (403
otherwise): they make the server read folders from its own disk. A loaded
adapter is a model clients name (`"model": lora_name`) on every API, listed on
/v1/models with its base as `parent`.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from selfhost.server.errors import OpenAIErrorBody, documented_errors
from selfhost.server.wire import Lenient

router = APIRouter(prefix="/v1", tags=["lora"], responses=documented_errors(OpenAIErrorBody))


class LoadLoRAAdapterRequest(Lenient):
    lora_name: str = Field(min_length=1, max_length=256, description="The model name requests will use.")
    lora_path: str = Field(min_length=1, description="A PEFT adapter folder on the server's disk.")


class UnloadLoRAAdapterRequest(Lenient):
    lora_name: str = Field(min_length=1, max_length=256)


class LoRAAdapterCard(BaseModel):
    id: str
    object: Literal["lora_adapter"] = "lora_adapter"
    parent: str  # the base model it runs on
    path: str
    rank: int
    target_modules: list[str]
    num_params: int


class DeletedLoRAAdapter(BaseModel):
    id: str
    object: Literal["lora_adapter"] = "lora_adapter"
    deleted: bool = True


@router.post("/load_lora_adapter", response_model=LoRAAdapterCard)
async def load_lora_adapter(req: LoadLoRAAdapterRequest, request: Request) -> LoRAAdapterCard:
    """Read, check and serve an adapter: 400 for a folder that is no adapter or does not fit the base
    (shapes, layer count, rank above --max-lora-rank, pickle weights without --lora-allow-pickle),
    409 for a name already in use."""
    registry = request.app.state.models
    served = await registry.add_adapter(req.lora_name, req.lora_path)
    info = served.llm.adapters.info[served.lora]
    return LoRAAdapterCard(id=served.name, parent=served.parent, path=req.lora_path, rank=info.rank,
                           target_modules=list(info.target_modules), num_params=info.num_params)


@router.post("/unload_lora_adapter", response_model=DeletedLoRAAdapter)
async def unload_lora_adapter(req: UnloadLoRAAdapterRequest, request: Request) -> DeletedLoRAAdapter:
    """Stop serving an adapter (404 if none has that name); requests already running finish with it."""
    request.app.state.models.remove_adapter(req.lora_name)
    return DeletedLoRAAdapter(id=req.lora_name)
