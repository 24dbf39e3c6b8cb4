"""Distillation text: JSON Lines documents and the one-source rule."""

import pytest

from selfhost.errors import InvalidParameterError
from selfhost.shrink.data import DataSource
from selfhost.train.data import CorpusError


def test_jsonl_lines_are_documents_and_text_files_mix_in(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "first line"}\n\n"second, a bare string"\n{"text": "third"}\n')
    (tmp_path / "b.txt").write_text("plain text")
    docs = DataSource(paths=(str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt"))).read()
    assert [d.text for d in docs] == ["first line", "second, a bare string", "third", "plain text"]
    assert docs[2].name.endswith("a.jsonl:4")


@pytest.mark.parametrize("line, message", [('{"txt": "x"}', "line 2 holds no text"), ("{oops", "line 2 is not JSON")])
def test_a_bad_jsonl_line_is_named(tmp_path, line, message):
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(CorpusError, match=message):
        DataSource(paths=(str(tmp_path / "a.jsonl"),)).read()


def test_exactly_one_source():
    with pytest.raises(InvalidParameterError, match="exactly one"):
        DataSource()
    with pytest.raises(InvalidParameterError, match="exactly one"):
        DataSource(preset="shakespeare", paths=("x.txt",))
