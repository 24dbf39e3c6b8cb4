"""One distillation run from teacher and text to an exported student, fresh or resumed.

Mirrors train/pipeline.py: every mistake a user can make (an existing output, a
student that does not share the teacher's tokenizer, a context longer than the
teacher's, a config too big for memory) fails before the teacher or the cache
costs any time; the student folder appears whole at the end or not at all.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console

from selfhost.hub import resolve_model
from selfhost.models.loader import read_config
from selfhost.shrink.data import DataSource
from selfhost.shrink.distill import DistillTrainer
from selfhost.shrink.kd_loss import DistillConfig
from selfhost.shrink.report_md import render_distillation_md
from selfhost.shrink.student import shape_of_config, student_shape
from selfhost.tokenizer import TokenizerMismatchError, check_same_tokenizer
from selfhost.shrink.teacher import Teacher
from selfhost.shrink.teacher_cache import cache_meta, open_or_build
from selfhost.train.baselines import baseline_losses
from selfhost.train.config import ModelShape, TrainConfig, check_fits
from selfhost.train.data import load_tokenizer, split_tokens, tokenizer_from_state, tokenizer_state
from selfhost.train.export import check_output, export_model
from selfhost.train.model import llama_config
from selfhost.train.pipeline import METRICS_FILE, OutputOptions, ResumeError, run_metrics

REPORT_FILE = "DISTILLATION.md"
DEFAULT_CONTEXT_LEN = 256
# The teacher's files the student takes verbatim: same tokenizer settings, chat template and generation defaults.
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                        "generation_config.json")


@dataclass(frozen=True)
class StudentInit:
    """What the student starts as: its config.json contents, its shape, and its weights (None: random)."""

    model_config: dict
    shape: ModelShape
    weights: dict[str, torch.Tensor] | None
    description: str


def fresh_student(choice: str, teacher_cfg: dict, context_len: int) -> StudentInit:
    shape = student_shape(choice, teacher_cfg, context_len)
    config = llama_config(shape, teacher_cfg["vocab_size"], teacher_cfg.get("bos_token_id"),
                          teacher_cfg.get("eos_token_id"), teacher_cfg.get("pad_token_id"))
    return StudentInit(config, shape, None, f"fresh {choice} student")


def pruned_student(ref: str, teacher_dir: Path, teacher_tok, context_len: int) -> StudentInit:
    """A checkpoint folder (a pruned copy of the teacher) as the starting point."""
    from selfhost.models.loader import load_model

    student_dir = resolve_model(ref)
    config = read_config(student_dir)
    check_same_tokenizer(teacher_tok, load_tokenizer(student_dir), read_config(teacher_dir)["vocab_size"],
                         config["vocab_size"], ("teacher", f"student {student_dir}"),
                         "distillation needs a student that shares the teacher's tokenizer")
    weights = load_model(student_dir, torch.float32, torch.device("cpu")).state_dict()
    return StudentInit(config, shape_of_config(config, context_len), weights, f"pruned student {student_dir}")


def default_context_len(teacher_dir: Path) -> int:
    return min(DEFAULT_CONTEXT_LEN, read_config(teacher_dir).get("max_position_embeddings", DEFAULT_CONTEXT_LEN))


def side_files(model_dir: Path) -> dict[str, str]:
    return {name: (model_dir / name).read_text() for name in TOKENIZER_SIDE_FILES if (model_dir / name).is_file()}


def distill(
    teacher_ref: str,
    student: StudentInit,
    data: DataSource,
    cfg: TrainConfig,
    kd: DistillConfig,
    output: OutputOptions,
    device: torch.device,
    cache_dir: Path | None = None,
    show_progress: bool = True,
    console: Console | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Distill `teacher_ref` into `student` on `data`; returns the exported folder (with `extra_files` in it)."""
    console = console or Console(stderr=True)
    check_output(output.out, output.overwrite)
    teacher_dir = resolve_model(teacher_ref)
    teacher_cfg = read_config(teacher_dir)
    if student.model_config["vocab_size"] != teacher_cfg["vocab_size"]:
        raise TokenizerMismatchError(f"the student's vocabulary ({student.model_config['vocab_size']}) differs "
                                     f"from the teacher's ({teacher_cfg['vocab_size']})")
    check_fits(student.shape, cfg.batch_size, device)
    tok = load_tokenizer(teacher_dir)
    teacher = Teacher(teacher_dir, device) if kd.uses_teacher else None
    if teacher is not None:
        teacher.check_context(student.shape.context_len)
    docs = data.read()
    split = split_tokens(docs, tok, cfg.val_fraction, student.shape.context_len)
    console.print(f"text: {len(docs)} documents -> {len(split.train):,} training and {len(split.val):,} validation "
                  f"tokens; teacher {teacher_dir}", highlight=False)
    meta = {
        "source": data.to_json(),
        "num_documents": len(docs),
        "command": output.command,
        "tokenizer": tokenizer_state(tok),
        "side_files": side_files(teacher_dir),
        "extra_files": extra_files or {},
        "teacher": str(teacher_dir),
        "teacher_fingerprint": teacher.fingerprint if teacher is not None else None,
        "student": student.description,
        "distill": asdict(kd),
        "cache_dir": str(cache_dir or output.out.with_name(output.out.name + "-teacher-cache")),
    }
    trainer = _trainer(student.model_config, student.shape, cfg, split, device, kd, teacher, meta,
                       output.checkpoints, student.weights, show_progress, console)
    console.print(f"student: {trainer.num_params / 1e6:.2f}M parameters ({student.description}); "
                  f"T={kd.temperature:g}, alpha={kd.alpha:g}", highlight=False)
    return _finish(trainer, tok, output, show_progress, console)


def _trainer(model_config, shape, cfg, split, device, kd, teacher, meta, checkpoint_dir, weights, show_progress,
             console) -> DistillTrainer:
    cache = None
    if kd.cache_top_k is not None and teacher is not None:
        settings = cache_meta(teacher.fingerprint, split.fingerprint, shape.context_len,
                              min(kd.cache_top_k, teacher.vocab_size), kd.temperature)
        cache = open_or_build(Path(meta["cache_dir"]), teacher, split.train, settings, console, show_progress)
    return DistillTrainer(model_config, shape, cfg, split, device, kd, teacher, cache, weights, checkpoint_dir, meta,
                          console)


def distill_resume(checkpoint: Path, output: OutputOptions, device: torch.device, show_progress: bool = True,
                   console: Console | None = None) -> Path:
    """Continue a distillation from its checkpoint with the checkpoint's own teacher, text and settings."""
    console = console or Console(stderr=True)
    check_output(output.out, output.overwrite)
    if not checkpoint.is_file():
        raise ResumeError(f"checkpoint {checkpoint} does not exist")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for a bad file
        raise ResumeError(f"checkpoint {checkpoint} cannot be read: {type(err).__name__}: {err}") from err
    meta = state["meta"]
    if "distill" not in meta:
        raise ResumeError(f"checkpoint {checkpoint} is not a distillation's; resume it with `selfhost train --resume`")
    shape, cfg = ModelShape(**state["shape"]), TrainConfig(**state["train_config"])
    kd = DistillConfig(**meta["distill"])
    tok = tokenizer_from_state(meta["tokenizer"])
    split = split_tokens(DataSource.from_json(meta["source"]).read(), tok, cfg.val_fraction, shape.context_len)
    if split.fingerprint != state["data_fingerprint"]:
        raise ResumeError(f"the text has changed since checkpoint {checkpoint} was written "
                          f"(token fingerprint {split.fingerprint}, expected {state['data_fingerprint']})")
    teacher = Teacher(Path(meta["teacher"]), device) if kd.uses_teacher else None
    if teacher is not None and teacher.fingerprint != meta["teacher_fingerprint"]:
        raise ResumeError(f"the teacher {meta['teacher']} has changed since checkpoint {checkpoint} was written")
    trainer = _trainer(state["model_config"], shape, cfg, split, device, kd, teacher, meta,
                       output.checkpoint_dir or checkpoint.parent, None, show_progress, console)
    trainer.load_state_dict(state)
    console.print(f"resuming at step {trainer.step}/{cfg.max_steps} from {checkpoint}", highlight=False)
    return _finish(trainer, tok, output, show_progress, console)


def _finish(trainer: DistillTrainer, tok, output: OutputOptions, show_progress: bool, console: Console) -> Path:
    history = trainer.run(show_progress)
    baselines = baseline_losses(trainer.split.train, trainer.val_windows.cpu(), len(tok))
    metrics = run_metrics(trainer, history, baselines, output)
    teacher_loss = trainer.teacher_val_loss()
    metrics["distillation"] = {
        **asdict(trainer.kd),
        "teacher": trainer.meta["teacher"],
        "teacher_num_params": (sum(p.numel() for p in trainer.teacher.model.parameters())
                               if trainer.teacher is not None else None),
        "teacher_val_loss": teacher_loss,
        "teacher_val_ppl": math.exp(teacher_loss) if teacher_loss is not None else None,
        "student": trainer.meta["student"],
    }
    extra = {**trainer.meta["side_files"], **trainer.meta["extra_files"],
             METRICS_FILE: json.dumps(metrics, indent=2) + "\n", REPORT_FILE: render_distillation_md(metrics)}
    out = export_model(trainer.model, trainer.model_config, tok, output.out, output.overwrite, output.save_dtype,
                       extra)
    final = history[-1]
    versus = f"; teacher {teacher_loss:.4f} (ppl {math.exp(teacher_loss):.1f})" if teacher_loss is not None else ""
    console.print(f"val loss {final.val_loss:.4f} (ppl {final.val_ppl:.1f}){versus}. Wrote {out}", highlight=False)
    if not output.keep_checkpoints and trainer.checkpoint_dir is not None:
        shutil.rmtree(trainer.checkpoint_dir, ignore_errors=True)
    return out
