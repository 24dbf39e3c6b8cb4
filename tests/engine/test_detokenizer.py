import pytest

import random

from selfhost.engine.detokenizer import IncrementalDetokenizer, window_decoder
from selfhost.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return Tokenizer(tiny_checkpoint("llama"))


def stream_deltas(tokenizer, text, stop=()):
    detok = IncrementalDetokenizer(tokenizer, stop)
    deltas = []
    for token in tokenizer.hf.encode(text, add_special_tokens=False):
        detok.add(token)
        deltas.append(detok.take_delta())
        if detok.stopped:
            break
    detok.flush()
    deltas.append(detok.take_delta(final=True))
    return deltas, detok


def test_multibyte_characters_never_split(tokenizer):
    text = "naïve café — 東京 🙂 done"
    ids = tokenizer.hf.encode(text, add_special_tokens=False)
    # The byte-level vocabulary must really split some character across tokens.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    deltas, _ = stream_deltas(tokenizer, text)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("stop", ["question", "n: wh", "e, o"])
def test_stop_string_cut_even_across_tokens(tokenizer, stop):
    text = "To be, or not to be, that is the question: whether"
    deltas, detok = stream_deltas(tokenizer, text, (stop,))
    expected = text[: text.find(stop)]
    assert detok.stopped
    assert detok.text == expected
    # Streaming never showed any part of the stop string.
    assert "".join(deltas) == expected


def test_held_back_prefix_is_released_when_no_stop_follows(tokenizer):
    deltas, detok = stream_deltas(tokenizer, "the slings and arrows", ("arrows!",))
    assert not detok.stopped
    assert "".join(deltas) == "the slings and arrows"


def test_window_decoder_gives_the_tokenizers_text(tokenizer):
    """The decode without transformers' wrapper returns exactly what Tokenizer.decode does, special and
    partial-character tokens included."""
    decode = window_decoder(tokenizer)
    assert decode != tokenizer.decode  # the fixture's tokenizer takes the direct path
    rng = random.Random(0)
    for _ in range(2000):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(0, 10))]
        assert decode(ids) == tokenizer.decode(ids), ids


def test_window_decoder_keeps_a_wrapped_decode(tokenizer):
    class Upper(Tokenizer):
        def decode(self, token_ids):
            return super().decode(token_ids).upper()

    wrapped = object.__new__(Upper)
    wrapped.hf = tokenizer.hf
    assert window_decoder(wrapped) == wrapped.decode

