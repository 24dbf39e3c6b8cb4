"""The exported GGUF runs in llama.cpp (llama-cpp-python) like it runs in selfhost.

Slow: llama-cpp-python builds llama.cpp from source on install (~9 minutes).
Run with `python -m pytest tests/quant -m slow`.
Bounds: f16 logits within 0.5% of the logit range of selfhost's fp32 logits and
identical greedy continuations; q8_0 logits within 3% and the same tokenizer ids.
"""

import numpy as np
import pytest
import torch

from selfhost import LLM, SamplingParams
from selfhost.quant.gguf_export import export_gguf
from selfhost.quant.perplexity import _WindowKV

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow

TEXT = "To be, or not to be, that is the question"


@pytest.mark.parametrize("family", ["llama", "llama3-rope", "qwen2", "qwen3"])
@pytest.mark.parametrize("gguf_type,tolerance", [("f16", 0.005), ("q8_0", 0.03)])
def test_llama_cpp_logits_and_greedy_match_selfhost(tiny_checkpoint, tmp_path, family, gguf_type, tolerance):
    src = tiny_checkpoint(family)
    llm = LLM(str(src), device="cpu", max_num_seqs=1, kv_cache_memory=1 << 22)
    prompt = llm.tokenizer.encode(TEXT)
    with torch.inference_mode():
        hidden = llm.model(torch.tensor(prompt), torch.arange(len(prompt)), _WindowKV())
        ours = llm.model.compute_logits(hidden).numpy()

    path = tmp_path / f"{family}.{gguf_type}.gguf"
    export_gguf(src, path, gguf_type)
    lc = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2, seed=0)
    assert lc.tokenize(TEXT.encode()) == prompt  # same vocabulary, merges and BOS handling
    lc.eval(prompt)
    theirs = np.array(lc.scores[: len(prompt)])
    assert np.abs(theirs - ours).max() <= tolerance * (ours.max() - ours.min())

    if gguf_type == "f16":
        lc.reset()
        continuation = []
        for token in lc.generate(prompt, temp=0.0, top_k=1, reset=True):
            continuation.append(token)
            if len(continuation) == 12:
                break
        greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        assert continuation == llm.generate([prompt], greedy)[0].token_ids
