import pytest

import selfhost  # noqa: F401  (before torch, as users should: it sets OpenMP's wait policy)
import torch

from tests.tiny_models import make_tiny_checkpoint

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory):
    """What selfhost caches per machine (weight_dtype="auto"'s measurement) goes to a folder of the
    run's own, never the user's home; servers the tests start inherit it."""
    import os

    os.environ["SELFHOST_CACHE_DIR"] = str(tmp_path_factory.mktemp("selfhost-cache"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: a saved tiny checkpoint (model + tokenizer) per architecture name, built once."""
    cache = {}

    def build(name: str):
        if name not in cache:
            cache[name] = make_tiny_checkpoint(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return build


@pytest.fixture(scope="session")
def tiny_llm(tiny_checkpoint):
    from selfhost import LLM

    return LLM(str(tiny_checkpoint("llama")))
