"""`selfhost finetune` (LoRA adapters on a frozen base) and `selfhost merge` (fold one into the base)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer

from selfhost.cli.console import make_console
from selfhost.errors import InvalidParameterError

_LORA = "Adapter"
_OPTIM = "Optimisation"


def _opt(*names: str, help: str, panel: str):
    return typer.Option(*names, help=help, rich_help_panel=panel)


def finetune(
    model: Annotated[str, typer.Argument(help="Base model: local folder, Hugging Face id or alias.")],
    data: Annotated[Path, typer.Option("--data", help="Training data: JSON Lines (messages, prompt/completion "
                                                      "or text per line) or a plain text file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the adapter (PEFT format).")],
    eval_data: Annotated[Path | None, typer.Option("--eval", help="Held-out data, same formats: loss and "
                                                                  "perplexity against the base model.")] = None,
    lora_rank: Annotated[int, _opt("--lora-rank", help="Rank r of each adapter.", panel=_LORA)] = 16,
    alpha: Annotated[float | None, _opt("--alpha", help="lora_alpha (default 2 x rank); "
                                        "the update is scaled by alpha / r.", panel=_LORA)] = None,
    targets: Annotated[str, _opt("--targets", help="Projections to adapt, comma-separated: q,k,v,o,gate,up,down.",
                                 panel=_LORA)] = "q,k,v,o,gate,up,down",
    rslora: Annotated[bool, _opt("--rslora", help="Scale by alpha / sqrt(r) (rank-stabilised LoRA).",
                                 panel=_LORA)] = False,
    steps: Annotated[int, _opt("--steps", help="Optimizer steps.", panel=_OPTIM)] = 100,
    batch_size: Annotated[int, _opt("--batch-size", help="Examples per micro-batch.", panel=_OPTIM)] = 4,
    grad_accum: Annotated[int, _opt("--grad-accum", help="Micro-batches per step.", panel=_OPTIM)] = 1,
    lr: Annotated[float, _opt("--lr", help="Peak learning rate.", panel=_OPTIM)] = 1e-3,
    warmup_steps: Annotated[int | None, _opt("--warmup-steps", help="Linear warm-up steps (default 5%).",
                                             panel=_OPTIM)] = None,
    grad_clip: Annotated[float, _opt("--grad-clip", help="Max gradient norm.", panel=_OPTIM)] = 1.0,
    eval_every: Annotated[int, _opt("--eval-every", help="Evaluate every N steps.", panel=_OPTIM)] = 50,
    max_len: Annotated[int, _opt("--max-len", help="Tokens per example (longer ones are cut).",
                                 panel=_OPTIM)] = 512,
    seed: Annotated[int, _opt("--seed", help="Seed for initialisation and data order.", panel=_OPTIM)] = 0,
    checkpoint_every: Annotated[int, _opt("--checkpoint-every", help="Checkpoint every N steps (into "
                                          "<out>-checkpoints).", panel=_OPTIM)] = 250,
    resume: Annotated[Path | None, typer.Option(help="Continue from a checkpoint (.pt) written with the same "
                                                     "settings and data.")] = None,
    keep_checkpoints: Annotated[bool, typer.Option(help="Keep checkpoints after a successful save.")] = False,
    quantization: Annotated[str | None, typer.Option(help="Train over an int8 or int4 copy of the base "
                                                          "(QLoRA-style; the adapters stay fp32).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    threads: Annotated[int | None, typer.Option(help="CPU threads.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")] = False,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
) -> None:
    """Train LoRA adapters on a frozen base model and write them in Hugging Face PEFT's format.

    Example: selfhost finetune ./base --data train.jsonl --lora-rank 16 --steps 200 -o my-adapter
    """
    import torch

    from selfhost.device import pick_device
    from selfhost.hub import resolve_model
    from selfhost.lora.adapter_format import SHORT_NAMES, LoraConfig
    from selfhost.lora.data import load_examples
    from selfhost.lora.finetune import Finetuner, load_base
    from selfhost.quant.config import QuantConfig
    from selfhost.tokenizer import Tokenizer
    from selfhost.train.config import TrainConfig
    from selfhost.train.export import check_output

    check_output(out, overwrite)  # before any work
    if quantization is not None:
        QuantConfig(method=quantization)  # refuses an unknown method before the load
    if threads is not None:
        if threads < 1:
            raise InvalidParameterError(f"--threads={threads} must be at least 1")
        torch.set_num_threads(threads)
    if max_len < 2:
        raise InvalidParameterError(f"--max-len={max_len} must be at least 2")
    names = [t.strip() for t in targets.split(",") if t.strip()]
    unknown = [t for t in names if t not in SHORT_NAMES and t not in SHORT_NAMES.values()]
    if unknown or not names:
        raise InvalidParameterError(f"unknown --targets {', '.join(unknown) or '(none)'}; "
                                    f"choose from {', '.join(SHORT_NAMES)}")
    lora = LoraConfig(rank=lora_rank, alpha=alpha if alpha is not None else 2.0 * lora_rank,
                      target_modules=tuple(dict.fromkeys(SHORT_NAMES.get(t, t) for t in names)),
                      use_rslora=rslora, base_model_name_or_path=model)
    cfg = TrainConfig(max_steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                      warmup_steps=warmup_steps, weight_decay=0.0, grad_clip=grad_clip, eval_every=eval_every,
                      checkpoint_every=checkpoint_every, seed=seed)
    model_dir = resolve_model(model)
    tok = Tokenizer(model_dir)
    train = load_examples(data, tok, max_len)
    held_out = load_examples(eval_data, tok, max_len) if eval_data is not None else None
    base = load_base(model_dir, pick_device(device), max_len, quantization)
    pad_id = next(i for i in (tok.hf.pad_token_id, tok.hf.eos_token_id, 0) if i is not None)
    console = make_console()
    checkpoints = out.with_name(out.name + "-checkpoints")
    tuner = Finetuner(base, lora, cfg, train, pad_id, checkpoint_dir=checkpoints)
    if resume is not None:
        tuner.resume(resume)
        console.print(f"resuming at step {tuner.step}/{cfg.max_steps} from {resume}", highlight=False)
    console.print(f"adapting {', '.join(lora.target_modules)} at rank {lora.rank}: "
                  f"{tuner.trainable_params:,} trainable parameters "
                  f"({100 * tuner.trainable_params / tuner.base_params:.2f}% of the base's {tuner.base_params:,}); "
                  f"{len(train)} training examples", highlight=False)
    result = tuner.run(held_out, show_progress=progress)
    tuner.save(out, overwrite, result)
    if not keep_checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)
    line = f"wrote {out} after {result.steps} steps ({result.elapsed_s:.0f} s), final train loss {result.train_loss:.4f}"
    if result.eval_loss is not None:
        line += (f"; eval perplexity {result.eval_ppl:.2f} with the adapter, "
                 f"{result.base_eval_ppl:.2f} for the base model")
    console.print(line, highlight=False)


def merge(
    model: Annotated[str, typer.Argument(help="Base model: local folder, Hugging Face id or alias.")],
    adapter: Annotated[Path, typer.Argument(help="Adapter folder (adapter_config.json + "
                                                 "adapter_model.safetensors).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the merged checkpoint.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")] = False,
) -> None:
    """Fold a LoRA adapter into its base model: a plain checkpoint that needs no adapter support."""
    from selfhost.hub import resolve_model
    from selfhost.lora.adapter_format import read_adapter
    from selfhost.lora.merge import merge_adapter
    from selfhost.train.export import check_output

    check_output(out, overwrite)
    loaded = read_adapter(adapter)
    merged = merge_adapter(resolve_model(model), loaded, out, overwrite)
    make_console().print(f"wrote {out}: {merged} weights merged", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("finetune")(finetune)
    app.command("merge")(merge)
