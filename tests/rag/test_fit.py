"""Fitting sources into a model's window: answer room first, then drop the lowest-ranked, then cut."""

import pytest

from selfhost.errors import InvalidParameterError
from selfhost.rag.answer import Source
from selfhost.rag.fit import CUT_MARK, fit_sources

OVERHEAD = 20  # "instructions and question", in words


def words(n, tag):
    return " ".join(f"{tag}{i}" for i in range(n))


def sources(*lengths):
    return [Source(i, f"doc{i}.txt", 0, words(n, f"s{i}w"), 0.9 - i / 100, 1.0 / i) for i, n in enumerate(lengths, 1)]


def count(kept):
    """A prompt's size in 'tokens': one per word, plus fixed instructions."""
    return OVERHEAD + sum(len(s.text.split()) for s in kept)


def test_everything_fits_unchanged():
    fitted = fit_sources(sources(30, 30), count, context_tokens=256, max_tokens=64)
    assert [s.number for s in fitted.sources] == [1, 2] and fitted.max_tokens == 64
    assert fitted.num_dropped == 0 and fitted.note() is None


def test_the_answer_gives_way_first_down_to_a_quarter_of_the_window():
    fitted = fit_sources(sources(80, 80), count, context_tokens=256, max_tokens=256)
    assert len(fitted.sources) == 2 and fitted.max_tokens == 256 - 180
    assert fitted.note() == "to fit the model's 256-token context: answer limited to 76 tokens (asked for 256)"


def test_lowest_ranked_are_dropped_and_the_next_is_cut():
    fitted = fit_sources(sources(100, 90, 80, 70), count, context_tokens=256, max_tokens=256)
    # Room for the prompt: 256 - 64 (the answer's floor) = 192 = 20 + 100 + 72 words of source 2.
    kept = fitted.sources
    assert [s.number for s in kept] == [1, 2] and kept[0].text == words(100, "s1w")
    assert kept[1].text == words(71, "s2w") + CUT_MARK and count(kept) == 192
    assert fitted.num_dropped == 2 and fitted.num_cut == 1 and fitted.max_tokens == 64
    assert fitted.note() == ("to fit the model's 256-token context: 2 of 4 sources dropped; source [2] cut short; "
                             "answer limited to 64 tokens (asked for 256)")


def test_a_cut_too_short_to_be_useful_is_dropped_instead():
    fitted = fit_sources(sources(160, 90), count, context_tokens=256, max_tokens=64)
    assert [s.number for s in fitted.sources] == [1] and fitted.num_cut == 0 and fitted.num_dropped == 1


def test_a_top_source_longer_than_the_window_is_cut():
    fitted = fit_sources(sources(500, 10), count, context_tokens=256, max_tokens=32)
    assert [s.number for s in fitted.sources] == [1] and fitted.sources[0].text.endswith(CUT_MARK)
    assert count(fitted.sources) <= 256 - 32 and fitted.max_tokens >= 32


def test_an_explicit_answer_length_can_be_kept_whole():
    fitted = fit_sources(sources(100, 100), count, context_tokens=256, max_tokens=100, min_answer_tokens=100)
    assert fitted.max_tokens == 100 and count(fitted.sources) <= 156


def test_no_room_even_for_a_cut_source_is_a_clear_error():
    with pytest.raises(InvalidParameterError, match="instructions and question take 2[01] tokens of the model's "
                                                    "24-token context"):
        fit_sources(sources(50), count, context_tokens=24, max_tokens=4, min_answer_tokens=4)
