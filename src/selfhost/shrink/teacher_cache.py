"""The teacher's top-k log-probabilities for every training window, computed once and kept on disk.

A live teacher runs a forward pass on every batch of every epoch; the cache runs it
once per window and the student's loop only reads. Per window position it stores
the k most likely token ids, their log-probabilities at the run's temperature
(fp16) and the log of the probability mass outside them (fp32), as .npy arrays
the loop memory-maps, so a cache larger than RAM still works.

`meta.json` names everything the numbers depend on (teacher, tokens, window
length, k, temperature); a cache whose meta differs is rebuilt, never reused.
The folder appears whole or not at all.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from selfhost.errors import InvalidParameterError
from selfhost.shrink.grid import grid_starts
from selfhost.shrink.kd_loss import TeacherTargets, top_k_targets
from selfhost.shrink.teacher import Teacher

CACHE_FORMAT_VERSION = 1
META_FILE = "meta.json"
# Teacher logits held at once while building: windows per forward pass are sized to this.
_BUILD_LOGITS_BYTES = 256 << 20


def cache_meta(teacher_fingerprint: str, data_fingerprint: str, context_len: int, top_k: int,
               temperature: float) -> dict:
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "teacher": teacher_fingerprint,
        "data": data_fingerprint,
        "context_len": context_len,
        "top_k": top_k,
        "temperature": temperature,
    }


class TeacherCache:
    """Read side: the cached targets of the windows a batch starts at."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.meta = json.loads((folder / META_FILE).read_text())
        self.context_len = self.meta["context_len"]
        self.ids = np.load(folder / "ids.npy", mmap_mode="r")  # (W, T, k) int16 or int32
        self.logprobs = np.load(folder / "logprobs.npy", mmap_mode="r")  # (W, T, k) fp16
        self.tail = np.load(folder / "tail.npy", mmap_mode="r")  # (W, T) fp32

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.ids, self.logprobs, self.tail))

    def targets(self, starts: torch.Tensor, device: torch.device) -> TeacherTargets:
        """Targets of the (B,) grid windows at `starts`, flattened to (B*T, ...) like the student's logits."""
        rows = (starts // self.context_len).numpy()
        assert (starts % self.context_len == 0).all(), "cached windows lie on the grid"
        k = self.ids.shape[-1]
        ids = torch.from_numpy(self.ids[rows].astype(np.int64)).reshape(-1, k)
        logprobs = torch.from_numpy(self.logprobs[rows].astype(np.float32)).reshape(-1, k)
        tail = torch.from_numpy(np.asarray(self.tail[rows])).reshape(-1)
        return TeacherTargets(logprobs.to(device), ids.to(device), tail.to(device))


def open_or_build(folder: Path, teacher: Teacher, train_tokens: torch.Tensor, meta: dict, console: Console,
                  show_progress: bool = True) -> TeacherCache:
    """The cache in `folder` if it was built for exactly `meta`; else build it there (replacing any other)."""
    meta_path = folder / META_FILE
    if meta_path.is_file() and json.loads(meta_path.read_text()) == meta:
        console.print(f"teacher cache: reusing {folder}", highlight=False)
        return TeacherCache(folder)
    if folder.exists() and not meta_path.is_file() and any(folder.iterdir()):
        raise InvalidParameterError(f"cache folder {folder} exists and is not a teacher cache; choose another "
                                    "--cache-dir (it would be replaced)")
    if folder.exists():
        console.print(f"teacher cache: {folder} was built for another teacher, text or setting; rebuilding",
                      highlight=False)
    _build(folder, teacher, train_tokens, meta, console, show_progress)
    cache = TeacherCache(folder)
    console.print(f"teacher cache: {cache.nbytes / 2**20:,.0f} MiB in {folder} (reused by runs with the same "
                  "teacher, text and settings; delete it when done)", highlight=False)
    return cache


def _build(folder: Path, teacher: Teacher, train_tokens: torch.Tensor, meta: dict, console: Console,
           show_progress: bool) -> None:
    T, k, temperature = meta["context_len"], meta["top_k"], meta["temperature"]
    k = min(k, teacher.vocab_size)
    starts = grid_starts(len(train_tokens), T)
    per_pass = max(1, _BUILD_LOGITS_BYTES // (T * teacher.vocab_size * 4))
    id_dtype = np.int16 if teacher.vocab_size <= np.iinfo(np.int16).max else np.int32
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        ids = np.lib.format.open_memmap(staging / "ids.npy", "w+", id_dtype, (len(starts), T, k))
        logprobs = np.lib.format.open_memmap(staging / "logprobs.npy", "w+", np.float16, (len(starts), T, k))
        tail = np.lib.format.open_memmap(staging / "tail.npy", "w+", np.float32, (len(starts), T))
        columns = [TextColumn("[bold]teacher cache"), BarColumn(), MofNCompleteColumn(), TextColumn("windows"),
                   TimeRemainingColumn()]
        with Progress(*columns, console=console, disable=not show_progress) as progress:
            task = progress.add_task("cache", total=len(starts))
            for first in range(0, len(starts), per_pass):
                batch = starts[first : first + per_pass]
                inputs = train_tokens[batch[:, None] + torch.arange(T)]  # (b, T)
                top = top_k_targets(teacher.logits(inputs), temperature, k)
                rows = slice(first, first + len(batch))
                ids[rows] = top.ids.reshape(len(batch), T, k).cpu().numpy().astype(id_dtype)
                logprobs[rows] = top.logprobs.reshape(len(batch), T, k).cpu().numpy().astype(np.float16)
                tail[rows] = top.tail_logprob.reshape(len(batch), T).cpu().numpy()
                progress.update(task, advance=len(batch))
        for array in (ids, logprobs, tail):
            array.flush()
        del ids, logprobs, tail
        (staging / META_FILE).write_text(json.dumps({**meta, "top_k": k}, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
