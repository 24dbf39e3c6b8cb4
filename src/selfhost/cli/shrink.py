"""`selfhost distill`, `selfhost prune` and `selfhost shrink-report`: shrinking beyond quantization."""

from __future__ import annotations

import datetime as dt
import re
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from selfhost.errors import InvalidParameterError

_OPTIM = "Optimisation (defaults: selfhost train's)"
_KD = "Distillation"
_CACHE_SPEC = re.compile(r"^top-k=(\d+)$")

Data = Annotated[list[Path] | None, typer.Option("--data", help="Training text: .txt/.md files, folders, or .jsonl "
                                                               "(one {\"text\": ...} per line). Repeatable.")]
Preset = Annotated[str | None, typer.Option(help="Use a training preset's corpus instead of --data (shakespeare).")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")]
Threads = Annotated[int | None, typer.Option(help="CPU threads (bit-exact reruns need the same count).")]
Progress = Annotated[bool, typer.Option(help="Show progress bars.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")]


def _opt(*names: str, help: str, panel: str):
    return typer.Option(*names, help=help, rich_help_panel=panel, show_default=False)


def parse_cache_spec(value: str | None) -> int | None:
    """`top-k=64` -> 64; None -> None (teacher runs live)."""
    if value is None:
        return None
    match = _CACHE_SPEC.match(value.strip())
    if not match:
        raise InvalidParameterError(f"--cache-teacher {value!r} is not understood; write it as top-k=64")
    return int(match[1])


def parse_layers(value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(part) for part in value.split(","))
    except ValueError:
        raise InvalidParameterError(
            f"--keep-layers {value!r} must be comma-separated layer indices, e.g. 0,1,3") from None


def _setup(threads: int | None, device: str):
    import torch

    from selfhost.device import pick_device

    if threads is not None:
        if threads < 1:
            raise InvalidParameterError(f"--threads={threads} must be at least 1")
        torch.set_num_threads(threads)
    return pick_device(device)


def _train_config(**overrides):
    from selfhost.train.config import TrainConfig

    return TrainConfig(**{k: v for k, v in overrides.items() if v is not None})


def _data_source(data: list[Path] | None, preset: str | None):
    from selfhost.shrink.data import DataSource

    return DataSource(preset=preset, paths=tuple(str(p) for p in data or ()))


def _command() -> str:
    return shlex.join(["selfhost", *sys.argv[1:]])


def distill(
    teacher: Annotated[str | None, typer.Argument(help="Teacher: folder, Hub id or alias.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (a Hugging Face model).")] = None,
    student_config: Annotated[str | None, typer.Option(help="Fresh student: half (about half the teacher; the "
                                                            "default), tiny, small, base, or a JSON file of shape "
                                                            "fields.")] = None,
    from_pruned: Annotated[str | None, typer.Option(help="Start from this pruned copy of the teacher instead.")] = None,
    data: Data = None,
    preset: Preset = None,
    temperature: Annotated[float, _opt("--temperature", help="Softmax temperature of both models [1].",
                                       panel=_KD)] = 1.0,
    alpha: Annotated[float, _opt("--alpha", help="Weight of the teacher's soft loss; the rest is next-token "
                                                 "loss [1: the teacher's distribution only].", panel=_KD)] = 1.0,
    cache_teacher: Annotated[str | None, _opt("--cache-teacher", help="top-k=K: compute the teacher's top K once "
                                              "and keep it on disk (default: run it live).", panel=_KD)] = None,
    cache_dir: Annotated[Path | None, _opt("--cache-dir", help="Default: <out>-teacher-cache.", panel=_KD)] = None,
    context_len: Annotated[int | None, _opt("--context-len", help="Training window (default: min(teacher "
                                            "context, 256)).", panel=_KD)] = None,
    steps: Annotated[int | None, _opt("--steps", help="Optimizer steps.", panel=_OPTIM)] = None,
    batch_size: Annotated[int | None, _opt("--batch-size", help="Sequences per micro-batch.", panel=_OPTIM)] = None,
    grad_accum: Annotated[int | None, _opt("--grad-accum", help="Micro-batches per step.", panel=_OPTIM)] = None,
    lr: Annotated[float | None, _opt("--lr", help="Peak learning rate.", panel=_OPTIM)] = None,
    warmup_steps: Annotated[int | None, _opt("--warmup-steps", help="Linear warm-up steps.", panel=_OPTIM)] = None,
    eval_every: Annotated[int | None, _opt("--eval-every", help="Validate every N steps.", panel=_OPTIM)] = None,
    checkpoint_every: Annotated[int | None, _opt("--checkpoint-every", help="Checkpoint every N steps.",
                                                 panel=_OPTIM)] = None,
    seed: Annotated[int | None, _opt("--seed", help="Seed for init and data order.", panel=_OPTIM)] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue from a checkpoint (.pt); its settings win.")] = None,
    overwrite: Overwrite = False,
    device: Device = "auto",
    threads: Threads = None,
    save_dtype: Annotated[str, typer.Option(help="Weights on disk: float32, float16, bfloat16.")] = "float32",
    checkpoint_dir: Annotated[Path | None, typer.Option(help="Default: <out>-checkpoints.")] = None,
    keep_checkpoints: Annotated[bool, typer.Option(help="Keep checkpoints after a successful export.")] = False,
    progress: Progress = True,
) -> None:
    """Distill TEACHER into a smaller student: its soft targets (KL at a temperature), mixed with the next token
    if --alpha < 1.

    Example: selfhost distill selfhost/shakespeare -o student --preset shakespeare --steps 600
    """
    from selfhost.hub import resolve_model
    from selfhost.models.loader import read_config
    from selfhost.shrink import distill_run
    from selfhost.shrink.kd_loss import DistillConfig
    from selfhost.shrink.student import HALF
    from selfhost.train.data import load_tokenizer
    from selfhost.train.pipeline import OutputOptions

    if out is None:
        raise InvalidParameterError("missing --out / -o: the folder to write the student to")
    torch_device = _setup(threads, device)
    output = OutputOptions(out=out, overwrite=overwrite, checkpoint_dir=checkpoint_dir,
                           keep_checkpoints=keep_checkpoints, save_dtype=save_dtype, command=_command())
    if resume is not None:
        distill_run.distill_resume(resume, output, torch_device, progress)
        return
    if teacher is None:
        raise InvalidParameterError("missing TEACHER: the model to distill (or --resume CHECKPOINT)")
    kd = DistillConfig(temperature=temperature, alpha=alpha, cache_top_k=parse_cache_spec(cache_teacher))
    cfg = _train_config(max_steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                        warmup_steps=warmup_steps, eval_every=eval_every, checkpoint_every=checkpoint_every, seed=seed)
    source = _data_source(data, preset)
    teacher_dir = resolve_model(teacher)
    context = context_len or distill_run.default_context_len(teacher_dir)
    if from_pruned is not None and student_config is not None:
        raise InvalidParameterError("pass --student-config (a fresh student) or --from-pruned, not both")
    if from_pruned is not None:
        student = distill_run.pruned_student(from_pruned, teacher_dir, load_tokenizer(teacher_dir), context)
    else:
        student = distill_run.fresh_student(student_config or HALF, read_config(teacher_dir), context)
    distill_run.distill(str(teacher_dir), student, source, cfg, kd, output, torch_device, cache_dir, progress)


def prune(
    model: Annotated[str, typer.Argument(help="Model to prune: folder, Hub id or alias.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (a checkpoint of the same family).")],
    drop_layers: Annotated[int, typer.Option(help="Remove the N layers that change their input least.")] = 0,
    keep_layers: Annotated[str | None, typer.Option(help="Keep exactly these layers, e.g. 0,1,3 (instead of "
                                                         "--drop-layers).")] = None,
    mlp_width: Annotated[float, typer.Option(help="Fraction of MLP channels kept.")] = 1.0,
    heads: Annotated[float, typer.Option(help="Fraction of attention heads kept (GQA groups stay uniform).")] = 1.0,
    calibration: Annotated[Path | None, typer.Option(help="Text that importance is measured on (default: the "
                                                          "--data text).")] = None,
    calibration_window: Annotated[int | None, typer.Option(help="Tokens per calibration window (default: "
                                                                "min(context, 256)).")] = None,
    calibration_windows: Annotated[int, typer.Option(help="Most calibration windows read.")] = 32,
    heal_steps: Annotated[int, typer.Option(help="Then distill from the unpruned model for N steps (needs "
                                                 "--data or --preset).")] = 0,
    data: Data = None,
    preset: Preset = None,
    temperature: Annotated[float, _opt("--temperature", help="Healing temperature [1].", panel=_KD)] = 1.0,
    alpha: Annotated[float, _opt("--alpha", help="Healing: weight of the teacher's soft loss [1].", panel=_KD)] = 1.0,
    batch_size: Annotated[int | None, _opt("--batch-size", help="Healing sequences per step.", panel=_OPTIM)] = None,
    lr: Annotated[float, _opt("--lr", help="Healing peak learning rate [1e-3].", panel=_OPTIM)] = 1e-3,
    seed: Annotated[int | None, _opt("--seed", help="Healing data order.", panel=_OPTIM)] = None,
    overwrite: Overwrite = False,
    device: Device = "auto",
    threads: Threads = None,
    progress: Progress = True,
) -> None:
    """Make MODEL smaller for real: fewer layers, narrower MLPs, fewer heads; optionally heal by distillation.

    Example: selfhost prune default -o pruned --drop-layers 1 --mlp-width 0.75 --preset shakespeare --heal-steps 200
    """
    from selfhost.shrink import prune_run
    from selfhost.shrink.kd_loss import DistillConfig
    from selfhost.shrink.prune import PruneConfig

    torch_device = _setup(threads, device)
    cfg = PruneConfig(drop_layers=drop_layers, keep_layers=parse_layers(keep_layers), mlp_width=mlp_width, heads=heads)
    if heal_steps < 0:
        raise InvalidParameterError(f"--heal-steps {heal_steps} must be >= 0")
    has_data = bool(data) or preset is not None
    if heal_steps and not has_data:
        raise InvalidParameterError("--heal-steps needs training text: pass --data FILE or --preset")
    source = _data_source(data, preset) if has_data else None
    if calibration is not None:
        calibration_text = _read_text(calibration)
    elif source is not None:
        calibration_text = "\n".join(doc.text for doc in source.read())
    else:
        calibration_text = None
    calib = None if calibration_text is None else prune_run.Calibration(calibration_text, calibration_window,
                                                                         calibration_windows)
    heal = None
    if heal_steps:
        heal = prune_run.Heal(source, _train_config(max_steps=heal_steps, batch_size=batch_size, lr=lr, seed=seed,
                                                    eval_every=max(1, heal_steps // 4),
                                                    checkpoint_every=max(1, heal_steps // 4)),
                              DistillConfig(temperature=temperature, alpha=alpha))
    prune_run.prune(model, out, cfg, calib, heal, overwrite, _command(), torch_device, progress)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidParameterError(f"cannot read text file {path}: {e}") from e


def shrink_report(
    model: Annotated[str, typer.Argument(help="Base model: folder, Hub id or alias.")],
    text: Annotated[Path, typer.Option("--text", help="UTF-8 held-out text for perplexity (and prompts).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder: shrink_report.md/.json, frontier.png.")],
    variants: Annotated[str, typer.Option(help="Comma list: fp32, int8, int4 (the base model), FOLDER, "
                                               "FOLDER+int8, FOLDER+int4.")] = "fp32,int8,int4",
    decode_tokens: Annotated[int, typer.Option(help="Tokens decoded per speed run.")] = 64,
    repeats: Annotated[int, typer.Option(help="Timed runs per speed figure (median).")] = 3,
    batch_size: Annotated[int, typer.Option(help="Sequences decoded together for throughput.")] = 16,
    overwrite: Overwrite = False,
    threads: Threads = None,
) -> None:
    """Weight memory, decode speed, batched throughput and perplexity of every way MODEL was shrunk."""
    import platform

    import torch

    from selfhost.cpu_identity import read_cpu_identity
    from selfhost.shrink import report, report_output
    from selfhost.train.export import check_output

    _setup(threads, "cpu")
    check_output(out, overwrite)
    content = _read_text(text)
    settings = report.MeasureSettings(decode_tokens=decode_tokens, repeats=repeats, batch_size=batch_size)
    parsed = report.parse_variants(variants, model)
    eval_ids = report.eval_token_ids(parsed, content, settings)
    rows = report.measure_all(parsed, eval_ids, settings)
    about = {
        "model": model, "text": str(text), "eval_tokens": len(eval_ids), "decode_tokens": decode_tokens,
        "repeats": repeats, "batch_size": batch_size, "cpu": read_cpu_identity().model,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.machine(), "date": dt.date.today().isoformat(),
        "command": _command(),
    }
    report_output.print_table(rows, f"shrink report: {model} (CPU)")
    written = report_output.write_report(rows, about, out, overwrite)
    typer.echo(f"wrote {written / report_output.MARKDOWN_FILE} and {written / report_output.PLOT_FILE}")


def register(app: typer.Typer) -> None:
    app.command("distill")(distill)
    app.command("prune")(prune)
    app.command("shrink-report")(shrink_report)
