import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from selfhost.errors import InvalidParameterError, UnsupportedModelError
from selfhost.rag.embed import Embedder

TEXTS = [
    "A short one.",
    "Volcanoes form where molten rock rises through the crust, and lava flows downhill. " * 6,
    "Tides follow the moon.",
    "word " * 400,  # longer than the model's 256-token window: truncated the same way
]


@pytest.fixture(scope="module")
def reference(embedder):
    return SentenceTransformer(str(embedder.folder), device="cpu")


def _cosines(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_single_text_matches_sentence_transformers(embedder, reference):
    ours = embedder.embed([TEXTS[1]]).vectors
    theirs = reference.encode([TEXTS[1]], normalize_embeddings=True)
    assert ours.shape == (1, 384)
    assert np.all(1 - _cosines(ours, theirs) < 1e-5)


def test_batch_matches_sentence_transformers_in_input_order(embedder, reference):
    ours = Embedder(embedder.folder.as_posix(), batch_size=3).embed(TEXTS).vectors
    theirs = reference.encode(TEXTS, normalize_embeddings=True, batch_size=3)
    assert np.all(1 - _cosines(ours, theirs) < 1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_token_counts_include_special_tokens_and_truncate(embedder):
    out = embedder.embed(["hello world", "word " * 400])
    assert out.token_counts == [4, 256]  # [CLS] hello world [SEP]; capped at max_seq_length
    assert out.total_tokens == 260
    assert embedder.count_tokens(["word " * 400]) == [400]  # counting for chunking never truncates


def test_empty_input_and_bad_arguments(embedder):
    assert embedder.embed([]).vectors.shape == (0, 384)
    with pytest.raises(InvalidParameterError, match="list of strings"):
        embedder.embed("not a list")
    with pytest.raises(InvalidParameterError, match="batch_size"):
        Embedder(batch_size=0)


def test_generative_model_is_refused(tiny_checkpoint):
    with pytest.raises(UnsupportedModelError, match="not an embedding model"):
        Embedder(str(tiny_checkpoint("llama")))
