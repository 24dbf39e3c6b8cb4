"""Which paged cache a model's attention needs, from its spec (the engine's one choice of KV store)."""

from __future__ import annotations

from selfhost.engine.latent_cache import LatentKVCache
from selfhost.engine.paged_cache import PagedKVCache
from selfhost.engine.sink_cache import SinkKVCache

PagedStore = type[PagedKVCache] | type[LatentKVCache]


def kv_cache_type(spec) -> PagedStore:
    """Latent rows for multi-head latent attention (DeepSeek), keys and values with torch attention for
    attention sinks (gpt-oss), keys and values with the C kernels otherwise. (The transformers
    fallback's spec has neither field: its blocks only meter memory.)"""
    if getattr(spec, "is_mla", False):
        return LatentKVCache
    if getattr(spec, "attn_sinks", False):
        return SinkKVCache
    return PagedKVCache
