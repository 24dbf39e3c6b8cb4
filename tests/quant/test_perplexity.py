import math

import pytest
import torch
import transformers

from selfhost import LLM
from selfhost.errors import InvalidParameterError
from selfhost.quant.perplexity import perplexity
from tests.tiny_models import _CORPUS


def _reference(model_dir, ids, window, stride):
    """The same sliding-window protocol with transformers' own loss."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll, count, prev_end = 0.0, 0, 1
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        first = max(prev_end, begin + 1)
        with torch.no_grad():
            logits = hf(torch.tensor([ids[begin:end]])).logits[0]
        targets = torch.tensor(ids[first:end])
        nll += torch.nn.functional.cross_entropy(logits[first - 1 - begin : end - 1 - begin], targets, reduction="sum").item()
        count += end - first
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / count), count


@pytest.mark.parametrize("window,stride", [(64, 32), (100, 99), (512, 256)])
def test_matches_transformers(tiny_checkpoint, window, stride):
    path = tiny_checkpoint("llama")
    llm = LLM(str(path), device="cpu", max_num_seqs=1, kv_cache_memory=1 << 22)
    ids = llm.tokenizer.encode(_CORPUS[:1200])
    result = perplexity(llm.model, ids, window, stride)
    expected, count = _reference(path, ids, window, stride)
    assert result.num_tokens == count == len(ids) - 1
    assert result.perplexity == pytest.approx(expected, rel=1e-4)


def test_bad_window_and_short_text(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint("llama")), device="cpu", max_num_seqs=1, kv_cache_memory=1 << 22)
    with pytest.raises(InvalidParameterError, match="window 64 and stride 64"):
        perplexity(llm.model, list(range(100)), 64, 64)
    with pytest.raises(InvalidParameterError, match="window 4096"):
        perplexity(llm.model, list(range(100)), 4096)
    with pytest.raises(InvalidParameterError, match="1 token"):
        perplexity(llm.model, [5])
