"""One training run from corpus to exported folder, fresh or resumed.

The order is chosen so that every mistake a user can make (existing output,
missing corpus, a config too big for memory) fails before minutes are spent
training a tokenizer or a model.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console

from selfhost.errors import SelfhostError
from selfhost.train import presets
from selfhost.train.baselines import baseline_losses
from selfhost.train.config import ModelShape, TrainConfig, check_fits
from selfhost.train.data import (
    load_tokenizer,
    read_corpus,
    split_tokens,
    tokenizer_from_state,
    tokenizer_state,
    train_tokenizer,
)
from selfhost.train.export import check_output, export_model
from selfhost.train.model import llama_config
from selfhost.train.summary import render_training_md, unigram_warning
from selfhost.train.trainer import Trainer

METRICS_FILE = "training.json"
REPORT_FILE = "TRAINING.md"


@dataclass(frozen=True)
class CorpusSource:
    """Where the text comes from: a preset's corpus or files. Stored in checkpoints for --resume."""

    preset: str | None = None
    paths: tuple[str, ...] = ()

    def read(self):
        if self.preset is not None:
            return presets.preset(self.preset).corpus()
        return read_corpus([Path(p) for p in self.paths])


@dataclass(frozen=True)
class OutputOptions:
    out: Path
    overwrite: bool = False
    checkpoint_dir: Path | None = None  # default: <out>-checkpoints next to the output
    keep_checkpoints: bool = False  # after a successful export
    save_dtype: str = "float32"
    command: str = ""  # recorded in the metrics, so the run can be repeated

    @property
    def checkpoints(self) -> Path:
        return self.checkpoint_dir or self.out.with_name(self.out.name + "-checkpoints")


class ResumeError(SelfhostError):
    """A checkpoint that cannot be resumed (missing, unreadable, or for different data)."""


def train_new(
    source: CorpusSource,
    shape: ModelShape,
    cfg: TrainConfig,
    output: OutputOptions,
    device: torch.device,
    tokenizer_path: Path | None = None,
    show_progress: bool = True,
    console: Console | None = None,
) -> Path:
    console = console or Console(stderr=True)
    check_output(output.out, output.overwrite)
    check_fits(shape, cfg.batch_size, device)
    docs = source.read()
    t0 = time.perf_counter()
    if tokenizer_path is not None:
        tok = load_tokenizer(tokenizer_path)
    else:
        tok = train_tokenizer(docs, shape.vocab_size)
    split = split_tokens(docs, tok, cfg.val_fraction, shape.context_len)
    console.print(
        f"corpus: {len(docs)} documents, {sum(len(d.text) for d in docs):,} characters -> "
        f"{len(split.train):,} training and {len(split.val):,} validation tokens "
        f"(vocabulary {len(tok)}, {time.perf_counter() - t0:.1f} s)",
        highlight=False,
    )
    model_config = llama_config(shape, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    meta = {
        "source": asdict(source),
        "tokenizer": tokenizer_state(tok),
        "num_documents": len(docs),
        "command": output.command,
    }
    trainer = Trainer(model_config, shape, cfg, split, device, output.checkpoints, meta, console=console)
    console.print(f"model: {trainer.num_params / 1e6:.2f}M parameters on {device}", highlight=False)
    return _finish(trainer, tok, output, show_progress, console)


def train_resume(
    checkpoint: Path, output: OutputOptions, device: torch.device, show_progress: bool = True,
    console: Console | None = None,
) -> Path:
    """Continue a run from its checkpoint with the checkpoint's own config and data."""
    console = console or Console(stderr=True)
    check_output(output.out, output.overwrite)
    if not checkpoint.is_file():
        raise ResumeError(f"checkpoint {checkpoint} does not exist")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for a bad file
        raise ResumeError(f"checkpoint {checkpoint} cannot be read: {type(err).__name__}: {err}") from err
    shape, cfg = ModelShape(**state["shape"]), TrainConfig(**state["train_config"])
    source = CorpusSource(state["meta"]["source"]["preset"], tuple(state["meta"]["source"]["paths"]))
    tok = tokenizer_from_state(state["meta"]["tokenizer"])
    split = split_tokens(source.read(), tok, cfg.val_fraction, shape.context_len)
    if split.fingerprint != state["data_fingerprint"]:
        raise ResumeError(
            f"the corpus has changed since checkpoint {checkpoint} was written "
            f"(token fingerprint {split.fingerprint}, expected {state['data_fingerprint']})"
        )
    trainer = Trainer(
        state["model_config"], shape, cfg, split, device, output.checkpoint_dir or checkpoint.parent,
        state["meta"], console=console,
    )
    trainer.load_state_dict(state)
    console.print(f"resuming at step {trainer.step}/{cfg.max_steps} from {checkpoint}", highlight=False)
    return _finish(trainer, tok, output, show_progress, console)


def _finish(trainer: Trainer, tok, output: OutputOptions, show_progress: bool, console: Console) -> Path:
    history = trainer.run(show_progress)
    baselines = baseline_losses(trainer.split.train, trainer.val_windows.cpu(), len(tok))
    metrics = run_metrics(trainer, history, baselines, output)
    extra = {METRICS_FILE: json.dumps(metrics, indent=2) + "\n", REPORT_FILE: render_training_md(metrics)}
    out = export_model(trainer.model, trainer.model_config, tok, output.out, output.overwrite, output.save_dtype,
                       extra)
    final = history[-1]
    console.print(
        f"val loss {final.val_loss:.4f} (ppl {final.val_ppl:.1f}); bigram baseline {baselines['bigram']:.4f}, "
        f"unigram {baselines['unigram']:.4f}. Wrote {out}",
        highlight=False,
    )
    warning = unigram_warning(metrics)
    if warning is not None:
        console.print(f"[bold yellow]warning:[/] {warning}", highlight=False)
    if not output.keep_checkpoints and trainer.checkpoint_dir is not None:
        shutil.rmtree(trainer.checkpoint_dir, ignore_errors=True)
    return out


def run_metrics(trainer: Trainer, history, baselines: dict[str, float], output: OutputOptions) -> dict:
    assert history, "run() always evaluates at the last step"
    final = history[-1]
    return {
        # A resumed run reports the command that started it; the resume is noted separately.
        "command": trainer.meta.get("command", output.command),
        "resumed_with": output.command if trainer.meta.get("command", output.command) != output.command else None,
        "val_loss": final.val_loss,
        "val_ppl": final.val_ppl,
        "train_loss": final.train_loss,
        "baselines": {name: {"val_loss": loss, "val_ppl": math.exp(loss)}
                      for name, loss in baselines.items()},
        "num_params": trainer.num_params,
        "steps": trainer.step,
        "warmup_steps": trainer.cfg.num_warmup_steps,
        "tokens_seen": trainer.tokens_seen,
        "epochs": trainer.sampler.epoch_progress,
        "train_tokens": len(trainer.split.train),
        "val_tokens_scored": trainer.val_windows[:, 1:].numel(),
        "training_time_s": trainer.elapsed_s,
        "tokens_per_s": trainer.tokens_seen / max(trainer.elapsed_s, 1e-9),
        "seed": trainer.cfg.seed,
        "save_dtype": output.save_dtype,
        "device": str(trainer.device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}",
        "model": asdict(trainer.shape),
        "train": asdict(trainer.cfg),
        "corpus": {**trainer.meta["source"], "documents": trainer.meta.get("num_documents")},
        "history": [{**asdict(p), "val_ppl": p.val_ppl} for p in history],
    }
