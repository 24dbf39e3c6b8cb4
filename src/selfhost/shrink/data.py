"""The text a student learns from: text files, folders, JSON Lines, or a training preset.

Stored in distillation checkpoints, so `--resume` reads the same documents again
(the token fingerprint then proves they did not change).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from selfhost.errors import InvalidParameterError
from selfhost.train import presets
from selfhost.train.data import CorpusError, Document, check_not_empty, read_corpus

JSONL_SUFFIX = ".jsonl"
JSONL_TEXT_FIELD = "text"


def read_jsonl(path: Path) -> list[Document]:
    """One document per line: a JSON string, or an object with a "text" field."""
    docs = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise CorpusError(f"{path} is not UTF-8 text: {err}") from err
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{path} line {number} is not JSON: {err.msg}") from err
        text = record.get(JSONL_TEXT_FIELD) if isinstance(record, dict) else record
        if not isinstance(text, str):
            raise CorpusError(
                f"{path} line {number} holds no text: expected a JSON string or an object with a "
                f"{JSONL_TEXT_FIELD!r} string field"
            )
        docs.append(Document(f"{path}:{number}", text))
    return docs


@dataclass(frozen=True)
class DataSource:
    """A training preset's corpus, or files (.txt/.md, folders of them, or .jsonl)."""

    preset: str | None = None
    paths: tuple[str, ...] = ()

    def __post_init__(self):
        if (self.preset is None) == (not self.paths):
            raise InvalidParameterError("pass training text with --data (files, folders or .jsonl) or --preset, "
                                        "exactly one of the two")

    def read(self) -> list[Document]:
        if self.preset is not None:
            return presets.preset(self.preset).corpus()
        docs: list[Document] = []
        for raw in self.paths:
            path = Path(raw)
            if path.is_file() and path.suffix == JSONL_SUFFIX:
                docs.extend(read_jsonl(path))
            else:
                docs.extend(read_corpus([path]))
        return check_not_empty(docs)

    def to_json(self) -> dict:
        return {"preset": self.preset, "paths": list(self.paths)}

    @classmethod
    def from_json(cls, data: dict) -> DataSource:
        return cls(data["preset"], tuple(data["paths"]))
