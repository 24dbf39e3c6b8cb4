import pytest

from selfhost.errors import InvalidParameterError, SelfhostError
from selfhost.rag.answer import answer_question, build_messages, cited_numbers, http_generator
from selfhost.rag.fit import PromptBudget


class RecordingGenerator:
    def __init__(self, reply):
        self.reply = reply
        self.calls = []

    def __call__(self, messages):
        self.calls.append(messages)
        return self.reply


def test_grounded_prompt_numbers_sources_and_answer_maps_citations(retriever):
    generate = RecordingGenerator("The boundary is the event horizon [1].")
    result = answer_question("what is the boundary of a black hole called", retriever, generate, k=3)
    system, user = generate.calls[0]
    assert system["role"] == "system" and "only the numbered sources" in system["content"]
    assert "[1] (from " in user["content"] and "black_holes.txt" in user["content"]
    assert result.sources[0].number == 1 and result.sources[0].path.endswith("black_holes.txt")
    assert result.cited == [1]
    assert result.is_grounded


def test_nothing_relevant_means_no_generation(retriever):
    generate = RecordingGenerator("made up")
    result = answer_question("qwxz plorf vantablim?", retriever, generate, min_similarity=0.5)
    assert generate.calls == []
    assert result.sources == [] and "nothing relevant" in result.text


def test_citations_outside_the_sources_are_ignored():
    assert cited_numbers("See [2], [1] and [2] again, not [7] or [0].", num_sources=3) == [2, 1]


def test_empty_question_is_refused(retriever):
    with pytest.raises(InvalidParameterError, match="empty"):
        answer_question("  ", retriever, RecordingGenerator(""))


def test_openai_compatible_endpoint(chat_server, retriever):
    url, received = chat_server
    result = answer_question("what is the event horizon", retriever, http_generator(url, "remote-model"))
    assert result.text == "From the sources [1]." and result.cited == [1]
    path, body = received[0]
    assert path == "/v1/chat/completions"
    assert body["model"] == "remote-model" and body["temperature"] == 0.0
    with pytest.raises(SelfhostError, match="answered 404"):
        answer_question("what is the event horizon", retriever, http_generator(url, "missing"))


def test_a_budget_fits_the_sources_and_the_answer_notes_it(retriever):
    def count_words(messages):
        return sum(len(m["content"].split()) for m in messages)

    generate = RecordingGenerator("The boundary is the event horizon [1].")
    question = "what is the boundary of a black hole called"
    unfitted = answer_question(question, retriever, RecordingGenerator(""), k=3, min_similarity=-1.0)
    assert len(unfitted.sources) == 3 and unfitted.note is None
    # A window that holds the prompt with the top source whole but not the other two, plus a 4-word answer.
    window = count_words(build_messages(question, unfitted.sources[:1])) + 4
    result = answer_question(question, retriever, generate, k=3, min_similarity=-1.0,
                             budget=lambda: PromptBudget(window, 4, count_words))
    assert [s.number for s in result.sources] == [1] and result.sources[0] == unfitted.sources[0]
    assert generate.calls[0] == build_messages(question, result.sources)
    assert result.note == f"to fit the model's {window}-token context: 2 of 3 sources dropped"
