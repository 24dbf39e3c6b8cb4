"""The exported GGUF runs in llama.cpp (llama-cpp-python) like it runs in transformers and selfhost.

Slow: llama-cpp-python builds llama.cpp from source on install (~9 minutes).
Run with `python -m pytest tests/quant -m slow`.
Bounds: f16 logits within 0.5% of the logit range of transformers' fp32 logits
and identical greedy continuations to selfhost's; q8_0 logits within 4% (llama.cpp
also rounds activations to 8 bits there; the worst family, the 6-layer Gemma 3,
measured 3.1%) and the same tokenizer ids.
"""

import pytest
import transformers

from selfhost.quant.gguf_export import export_gguf
from tests.quant.llama_cpp_check import assert_llama_cpp_matches
from tests.quant.test_gguf import byte_fallback_checkpoint
from tests.tiny_models import make_tiny_checkpoint

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow

TEXT = "To be, or not to be, that is the question"  # 14 tokens
# 28 tokens: crosses the 16-token sliding window of the tiny Gemma 2/3.
LONG_TEXT = TEXT + ": whether 'tis nobler in the mind to suffer the slings and arrows"
PROMPTS = {"gemma2": LONG_TEXT, "gemma3": LONG_TEXT}

# Where llama.cpp hard-codes what the shared tiny configs vary, the test model follows llama.cpp:
# - Gemma 3: five sliding layers per global one (the tiny config alternates);
# - Phi-3: llama.cpp pads its context to a multiple of 256 and switches to the long rope factors
#   whenever that exceeds the original context (transformers switches by sequence length), and
#   it ignores Phi-3's sliding window for now, so the test stays inside a wider one.
VARIANTS = {
    "gemma3": dict(num_hidden_layers=6, sliding_window_pattern=6),
    "phi3": dict(original_max_position_embeddings=256, max_position_embeddings=1024, sliding_window=64),
}
FAMILIES = ["llama", "llama3-rope", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint, tmp_path_factory):
    def build(family):
        if family not in VARIANTS:
            return tiny_checkpoint(family)
        # Not named after the family: llama.cpp gives models named "phi3" token attributes that
        # need Phi-3's own special tokens, which the tiny tokenizer lacks.
        return make_tiny_checkpoint(family, tmp_path_factory.mktemp("variant"), **VARIANTS[family])

    return build


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("gguf_type,tolerance", [("f16", 0.005), ("q8_0", 0.04)])
def test_llama_cpp_logits_and_greedy_match(checkpoint, tmp_path, family, gguf_type, tolerance):
    assert_llama_cpp_matches(llama_cpp, checkpoint(family), PROMPTS.get(family, TEXT), gguf_type, tolerance, tmp_path)


@pytest.mark.parametrize("prepend_space", [True, False])  # Llama 2 / Mistral style, Gemma style
def test_llama_cpp_tokenizes_sentencepiece_vocabularies_like_transformers(tmp_path, prepend_space):
    src = byte_fallback_checkpoint(tmp_path / "src", prepend_space)
    export_gguf(src, tmp_path / "m.gguf", "f16")
    lc = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=256, verbose=False)
    hf = transformers.AutoTokenizer.from_pretrained(src)
    for text in (TEXT, "Héllo wörld — 東京 🙂"):  # merges, and bytes the vocabulary lacks
        assert lc.tokenize(text.encode()) == hf.encode(text)
