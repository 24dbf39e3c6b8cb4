"""`selfhost train` (a model from text) and `selfhost list` (models on this machine)."""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from selfhost.cli.console import make_console
from rich.table import Table

from selfhost.errors import InvalidParameterError

_MODEL = "Model shape (default: the preset's, else --size)"
_OPTIM = "Optimisation (default: the preset's, else built-in defaults)"


def _opt(*names: str, help: str, panel: str):
    return typer.Option(*names, help=help, rich_help_panel=panel, show_default=False)


def train(
    corpus: Annotated[list[Path] | None, typer.Argument(help="Text files or folders (*.txt, *.md).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (a Hugging Face model).")] = None,
    preset: Annotated[str | None, typer.Option(help="Named recipe: corpus, size and schedule (shakespeare).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")] = False,
    resume: Annotated[Path | None, typer.Option(help="Continue from a checkpoint (.pt); its config wins.")] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="Reuse this tokenizer (folder or tokenizer.json).")] = None,
    size: Annotated[str | None, _opt("--size", help="tiny, small or base.", panel=_MODEL)] = None,
    vocab_size: Annotated[int | None, _opt("--vocab-size", help="BPE vocabulary to train.", panel=_MODEL)] = None,
    hidden_size: Annotated[int | None, _opt("--hidden-size", help="Model width.", panel=_MODEL)] = None,
    intermediate_size: Annotated[int | None, _opt("--intermediate-size", help="MLP width.", panel=_MODEL)] = None,
    layers: Annotated[int | None, _opt("--layers", help="Decoder layers.", panel=_MODEL)] = None,
    heads: Annotated[int | None, _opt("--heads", help="Attention heads.", panel=_MODEL)] = None,
    kv_heads: Annotated[int | None, _opt("--kv-heads", help="Key/value heads (GQA).", panel=_MODEL)] = None,
    context_len: Annotated[int | None, _opt("--context-len", help="Training sequence length.", panel=_MODEL)] = None,
    steps: Annotated[int | None, _opt("--steps", help="Optimizer steps.", panel=_OPTIM)] = None,
    batch_size: Annotated[int | None, _opt("--batch-size", help="Sequences per micro-batch.", panel=_OPTIM)] = None,
    grad_accum: Annotated[int | None, _opt("--grad-accum", help="Micro-batches per step.", panel=_OPTIM)] = None,
    lr: Annotated[float | None, _opt("--lr", help="Peak learning rate.", panel=_OPTIM)] = None,
    warmup_steps: Annotated[int | None, _opt("--warmup-steps", help="Linear warm-up steps.", panel=_OPTIM)] = None,
    weight_decay: Annotated[float | None, _opt("--weight-decay", help="AdamW weight decay.", panel=_OPTIM)] = None,
    grad_clip: Annotated[float | None, _opt("--grad-clip", help="Max gradient norm.", panel=_OPTIM)] = None,
    eval_every: Annotated[int | None, _opt("--eval-every", help="Validate every N steps.", panel=_OPTIM)] = None,
    checkpoint_every: Annotated[int | None, _opt("--checkpoint-every", help="Checkpoint every N steps.",
                                                 panel=_OPTIM)] = None,
    seed: Annotated[int | None, _opt("--seed", help="Seed for init and data order.", panel=_OPTIM)] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    threads: Annotated[int | None, typer.Option(help="CPU threads (bit-exact reruns need the same count).")] = None,
    save_dtype: Annotated[str, typer.Option(help="Weights on disk: float32, float16, bfloat16.")] = "float32",
    checkpoint_dir: Annotated[Path | None, typer.Option(help="Default: <out>-checkpoints.")] = None,
    keep_checkpoints: Annotated[bool, typer.Option(help="Keep checkpoints after a successful export.")] = False,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
) -> None:
    """Train a Llama-architecture model from text and write it as a Hugging Face folder.

    Example: selfhost train --preset shakespeare -o shakespeare-model
    """
    import torch

    from selfhost.device import pick_device
    from selfhost.train import config as tc
    from selfhost.train import pipeline, presets

    if out is None:
        raise InvalidParameterError("missing --out / -o: the folder to write the trained model to")
    if threads is not None:
        if threads < 1:
            raise InvalidParameterError(f"--threads={threads} must be at least 1")
        torch.set_num_threads(threads)
    output = pipeline.OutputOptions(
        out=out, overwrite=overwrite, checkpoint_dir=checkpoint_dir, keep_checkpoints=keep_checkpoints,
        save_dtype=save_dtype, command=shlex.join(["selfhost", *sys.argv[1:]]),
    )
    torch_device = pick_device(device)
    if resume is not None:
        pipeline.train_resume(resume, output, torch_device, progress)
        return
    if preset is not None and corpus:
        raise InvalidParameterError("pass either CORPUS files or --preset, not both")
    recipe = presets.preset(preset) if preset is not None else None
    if recipe is not None and size is not None:
        raise InvalidParameterError("--size does not combine with --preset; override single fields instead")
    base_shape = recipe.shape if recipe else tc.model_size(size or "small")
    base_cfg = recipe.train if recipe else tc.TrainConfig()
    shape = _replace(base_shape, vocab_size=vocab_size, hidden_size=hidden_size,
                     intermediate_size=intermediate_size, num_layers=layers, num_heads=heads,
                     num_kv_heads=kv_heads, context_len=context_len)
    cfg = _replace(base_cfg, max_steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                   warmup_steps=warmup_steps, weight_decay=weight_decay, grad_clip=grad_clip,
                   eval_every=eval_every, checkpoint_every=checkpoint_every, seed=seed)
    source = pipeline.CorpusSource(preset=preset, paths=tuple(str(p) for p in corpus or ()))
    pipeline.train_new(source, shape, cfg, output, torch_device, tokenizer, progress)


def _replace(obj, **overrides):
    """Dataclass `obj` with the flags that were given (not None) replaced; validation reruns."""
    return dataclasses.replace(obj, **{k: v for k, v in overrides.items() if v is not None})


def list_models() -> None:
    """Show the embedded demo model and the models in the Hugging Face cache."""
    from selfhost.hub import EMBEDDED_MODEL_DIR, EMBEDDED_MODEL_NAME

    table = Table(title="Models on this machine")
    for column in ("model", "where", "size on disk", "parameters", "val loss (ppl)"):
        table.add_column(column)
    if (EMBEDDED_MODEL_DIR / "config.json").exists():
        table.add_row(f"{EMBEDDED_MODEL_NAME} (default)", str(EMBEDDED_MODEL_DIR), _human_bytes(_folder_bytes(
            EMBEDDED_MODEL_DIR)), *_trained_figures(EMBEDDED_MODEL_DIR))
    for repo_id, path, size_bytes in _cached_hub_models():
        table.add_row(repo_id, str(path), _human_bytes(size_bytes), "", "")
    if not table.row_count:
        make_console().print("no models found: the embedded demo model is missing and the Hugging Face cache is empty")
        return
    make_console().print(table)


def _trained_figures(model_dir: Path) -> tuple[str, str]:
    metrics_path = model_dir / "training.json"
    if not metrics_path.exists():
        return "", ""
    m = json.loads(metrics_path.read_text())
    return f"{m['num_params'] / 1e6:.2f}M", f"{m['val_loss']:.3f} ({m['val_ppl']:.1f})"


def _cached_hub_models() -> list[tuple[str, Path, int]]:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir()
    except CacheNotFound:
        return []
    return sorted((r.repo_id, r.repo_path, r.size_on_disk) for r in cache.repos if r.repo_type == "model")


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("list")(list_models)
