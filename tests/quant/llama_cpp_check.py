"""The one comparison of a GGUF export run by llama.cpp against transformers and selfhost (slow tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

from selfhost import LLM, SamplingParams
from selfhost.quant.gguf_export import export_gguf

GREEDY_TOKENS = 12


def assert_llama_cpp_matches(llama_cpp, src: Path, text: str, gguf_type: str, tolerance: float, tmp_path: Path) -> None:
    """llama.cpp tokenizes `text` as selfhost does, its logits over the prompt are transformers' within
    `tolerance` of their range, and (f16) its greedy continuation is selfhost's."""
    llm = LLM(str(src), device="cpu", max_num_seqs=1, kv_cache_memory=1 << 22)
    prompt = llm.tokenizer.encode(text)
    reference = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        ref = reference(torch.tensor([prompt])).logits[0].numpy()

    path = tmp_path / f"{Path(src).name}.{gguf_type}.gguf"
    export_gguf(src, path, gguf_type)
    lc = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2, seed=0)
    assert lc.tokenize(text.encode()) == prompt  # same vocabulary, merges and BOS handling
    lc.eval(prompt)
    theirs = np.array(lc.scores[: len(prompt)])
    assert np.abs(theirs - ref).max() <= tolerance * (ref.max() - ref.min())

    if gguf_type == "f16":
        continuation = []
        for token in lc.generate(prompt, temp=0.0, top_k=1, reset=True):
            continuation.append(token)
            if len(continuation) == GREEDY_TOKENS:
                break
        greedy = SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0, ignore_eos=True)
        assert continuation == llm.generate([prompt], greedy)[0].token_ids
