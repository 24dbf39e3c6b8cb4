"""From text files to token tensors: corpus reading, the tokenizer, the split.

Every document ends with the end-of-text token. The validation split is the
tail of each document, so all plays (or books) are represented in both splits
and no validation text leaks into training.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from selfhost.errors import SelfhostError

END_OF_TEXT = "<|endoftext|>"
PAD = "<|pad|>"
TEXT_SUFFIXES = (".txt", ".md")


class CorpusError(SelfhostError):
    """A corpus path that does not exist, or a corpus with no text in it."""


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def read_corpus(paths: list[Path]) -> list[Document]:
    """Read text files; a folder contributes its *.txt and *.md files, sorted by path."""
    if not paths:
        raise CorpusError("no corpus given: pass one or more text files or folders, or --preset shakespeare")
    docs = []
    for path in paths:
        if not path.exists():
            raise CorpusError(f"corpus path {path} does not exist")
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES) if path.is_dir() else [path]
        if path.is_dir() and not files:
            raise CorpusError(f"corpus folder {path} holds no {' or '.join(TEXT_SUFFIXES)} files")
        for file in files:
            try:
                docs.append(Document(str(file), file.read_text(encoding="utf-8")))
            except UnicodeDecodeError as err:
                raise CorpusError(f"corpus file {file} is not UTF-8 text: {err}") from err
    return check_not_empty(docs)


def check_not_empty(docs: list[Document]) -> list[Document]:
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise CorpusError("the corpus is empty: no file holds any non-whitespace text")
    return docs


def train_tokenizer(docs: list[Document], vocab_size: int):
    """Byte-level BPE: any UTF-8 text encodes, no unknown tokens, lossless decoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d.text for d in docs), trainer)
    return wrap_tokenizer(tok.to_str(), END_OF_TEXT, END_OF_TEXT, PAD)


def wrap_tokenizer(tokenizer_json: str, bos: str | None, eos: str, pad: str | None):
    """A transformers fast tokenizer around a tokenizers JSON string (no BOS is added to inputs)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json), bos_token=bos, eos_token=eos, pad_token=pad
    )


def load_tokenizer(path: Path):
    """Reuse an existing tokenizer: a Hugging Face model folder or a bare tokenizer.json."""
    from transformers import AutoTokenizer

    if not path.exists():
        raise CorpusError(f"tokenizer path {path} does not exist")
    if path.is_dir():
        tok = AutoTokenizer.from_pretrained(str(path))
    else:
        tok = wrap_tokenizer(path.read_text(), None, END_OF_TEXT, None)
        if tok.convert_tokens_to_ids(END_OF_TEXT) is None:
            raise CorpusError(f"tokenizer {path} has no {END_OF_TEXT} token; pass its folder with tokenizer_config.json")
    if tok.eos_token_id is None:
        raise CorpusError(f"tokenizer {path} defines no end-of-text (eos) token, which separates documents")
    return tok


def tokenizer_state(tok) -> dict:
    """What a checkpoint stores to rebuild the exact tokenizer."""
    return {"json": tok.backend_tokenizer.to_str(), "bos": tok.bos_token, "eos": tok.eos_token, "pad": tok.pad_token}


def tokenizer_from_state(state: dict):
    return wrap_tokenizer(state["json"], state["bos"], state["eos"], state["pad"])


@dataclass(frozen=True)
class TokenSplit:
    train: torch.Tensor  # (N_train,) int64
    val: torch.Tensor  # (N_val,) int64

    @property
    def fingerprint(self) -> str:
        """Identifies the exact token streams, so a resumed run can refuse different data."""
        digest = hashlib.sha256(self.train.numpy().tobytes())
        digest.update(self.val.numpy().tobytes())
        return digest.hexdigest()[:16]


def split_tokens(docs: list[Document], tok, val_fraction: float, context_len: int) -> TokenSplit:
    encoded = tok(
        [d.text for d in docs], add_special_tokens=False, return_attention_mask=False, verbose=False
    )["input_ids"]
    train, val = [], []
    for ids in encoded:
        ids = ids + [tok.eos_token_id]
        cut = len(ids) - int(len(ids) * val_fraction)
        train.extend(ids[:cut])
        val.extend(ids[cut:])
    # Each needs at least one window of context_len inputs plus the shifted target.
    for name, ids in (("training", train), ("validation", val)):
        if len(ids) < context_len + 1:
            raise CorpusError(
                f"the corpus is too small: its {name} split has {len(ids)} tokens, fewer than "
                f"context_len + 1 = {context_len + 1}; add text or lower --context-len"
            )
    return TokenSplit(torch.tensor(train, dtype=torch.int64), torch.tensor(val, dtype=torch.int64))


def val_windows(val: torch.Tensor, context_len: int, max_tokens: int) -> torch.Tensor:
    """Non-overlapping (N, context_len + 1) windows over the first `max_tokens` validation tokens."""
    n = max(1, min(max_tokens, len(val) - 1) // context_len)
    n = min(n, (len(val) - 1) // context_len)
    starts = torch.arange(n) * context_len
    return val[starts[:, None] + torch.arange(context_len + 1)]


class BatchSampler:
    """Deterministic random windows of the training stream; its position is two ints.

    Each epoch cuts the stream into context_len-long windows starting at a
    random offset and visits them in a random order; both come from a
    generator seeded by (seed, epoch), so the sampler is rebuilt exactly from
    `state_dict()` without storing any permutation.
    """

    def __init__(self, num_tokens: int, context_len: int, batch_size: int, seed: int):
        self.num_tokens, self.context_len, self.batch_size, self.seed = num_tokens, context_len, batch_size, seed
        self.epoch, self.cursor = 0, 0
        self._starts = self._epoch_starts(0)

    def _epoch_starts(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        max_offset = max(1, min(self.context_len, self.num_tokens - self.context_len))
        offset = int(torch.randint(max_offset, (1,), generator=gen))
        starts = torch.arange(offset, self.num_tokens - self.context_len, self.context_len)
        return starts[torch.randperm(len(starts), generator=gen)]

    def next_starts(self) -> torch.Tensor:
        out = []
        while len(out) < self.batch_size:
            if self.cursor == len(self._starts):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._starts = self._epoch_starts(self.epoch)
            take = min(self.batch_size - len(out), len(self._starts) - self.cursor)
            out.extend(self._starts[self.cursor : self.cursor + take].tolist())
            self.cursor += take
        return torch.tensor(out)

    def next_batch(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch_size, context_len) inputs and their next-token targets."""
        windows = tokens[self.next_starts()[:, None] + torch.arange(self.context_len + 1)]
        return windows[:, :-1], windows[:, 1:]

    @property
    def epoch_progress(self) -> float:
        return self.epoch + self.cursor / max(1, len(self._starts))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._starts = self._epoch_starts(self.epoch)
