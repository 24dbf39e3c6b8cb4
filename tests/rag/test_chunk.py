import pytest

from selfhost.errors import InvalidParameterError
from selfhost.rag.chunk import ChunkConfig, chunk_text


def count_words(texts):
    return [len(t.split()) for t in texts]


def test_short_document_is_one_chunk():
    assert chunk_text("One paragraph.\n\nAnother one.", count_words) == ["One paragraph.\n\nAnother one."]


def test_chunks_fit_budget_and_keep_sentences_whole():
    sentences = [f"Sentence number {i} has exactly seven words." for i in range(40)]
    text = " ".join(sentences[:20]) + "\n\n" + " ".join(sentences[20:])
    chunks = chunk_text(text, count_words, ChunkConfig(max_tokens=30, overlap_tokens=10))
    assert len(chunks) > 5
    for chunk in chunks:
        assert len(chunk.split()) <= 30
        assert chunk.endswith("words.")  # cut only at sentence ends
    # Every sentence survives, in order.
    joined = " ".join(chunks)
    positions = [joined.find(s) for s in sentences]
    assert all(p >= 0 for p in positions)


def test_consecutive_chunks_overlap():
    text = " ".join(f"Fact {i} is here now." for i in range(30))  # 5 words per sentence
    chunks = chunk_text(text, count_words, ChunkConfig(max_tokens=20, overlap_tokens=10))
    assert len(chunks) >= 8
    for previous, current in zip(chunks, chunks[1:]):
        first_two = ". ".join(current.split(". ")[:2]) + "."  # 10 words of overlap = two sentences
        assert previous.endswith(first_two)


def test_overlong_sentence_is_cut_by_words():
    text = " ".join(["word"] * 95)
    chunks = chunk_text(text, count_words, ChunkConfig(max_tokens=20, overlap_tokens=0))
    assert [len(c.split()) for c in chunks] == [20, 20, 20, 20, 15]


@pytest.mark.parametrize("kwargs", [{"max_tokens": 4}, {"max_tokens": 100, "overlap_tokens": 60}, {"overlap_tokens": -1}])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(InvalidParameterError):
        ChunkConfig(**kwargs)
