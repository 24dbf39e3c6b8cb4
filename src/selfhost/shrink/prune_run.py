"""`selfhost prune` end to end: calibrate, choose, cut, optionally heal, write a standard checkpoint.

Healing is a short distillation (distill_run.py) from the unpruned model into
the pruned one, so it has the training loop's checkpoints and exact resume
(`selfhost distill --resume`). Every check runs before the calibration pass,
and the output folder appears whole or not at all.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console

from selfhost.errors import InvalidParameterError
from selfhost.hub import resolve_model
from selfhost.models.loader import load_model, read_config
from selfhost.shrink.data import DataSource
from selfhost.shrink.distill_run import StudentInit, distill, side_files
from selfhost.shrink.importance import Importance, calibration_windows, measure_importance
from selfhost.shrink.kd_loss import DistillConfig
from selfhost.shrink.prune import PruneConfig, PrunePlan, apply_plan, check_request, plan_pruning
from selfhost.shrink.student import shape_of_config
from selfhost.train.config import TrainConfig
from selfhost.train.data import load_tokenizer
from selfhost.train.export import SAVE_DTYPES, check_output, export_model
from selfhost.train.pipeline import OutputOptions

PRUNING_FILE = "pruning.json"
DEFAULT_CALIBRATION_WINDOWS = 32
_CHARS_PER_TOKEN_BOUND = 16  # BPE tokens rarely span more characters than this


@dataclass(frozen=True)
class Calibration:
    text: str
    window: int | None = None  # tokens per window; None: min(context, 256)
    max_windows: int = DEFAULT_CALIBRATION_WINDOWS


@dataclass(frozen=True)
class Heal:
    """A short distillation from the unpruned model into the pruned one."""

    data: DataSource
    train: TrainConfig
    kd: DistillConfig = DistillConfig(temperature=1.0, alpha=1.0)
    context_len: int | None = None


def _pruning_record(model_dir: Path, cfg: PruneConfig, plan: PrunePlan, importance: Importance | None,
                    params_before: int, params_after: int) -> dict:
    return {
        "source": str(model_dir),
        "request": asdict(cfg),
        "kept_layers": list(plan.keep_layers),
        "num_heads": plan.num_heads,
        "num_kv_heads": plan.num_kv_heads,
        "intermediate_size": plan.intermediate_size,
        "params_before": params_before,
        "params_after": params_after,
        "layer_scores": importance.layer_scores.tolist() if importance is not None else None,
        "calibration_tokens": importance.num_tokens if importance is not None else 0,
    }


def prune(
    model_ref: str,
    out: Path,
    cfg: PruneConfig,
    calibration: Calibration | None,
    heal: Heal | None = None,
    overwrite: bool = False,
    command: str = "",
    device: torch.device = torch.device("cpu"),
    show_progress: bool = True,
    console: Console | None = None,
) -> Path:
    console = console or Console(stderr=True)
    check_output(out, overwrite)
    model_dir = resolve_model(model_ref)
    config = read_config(model_dir)
    if "quantization_config" in config:
        raise InvalidParameterError(f"{model_dir} is quantized; prune its full-precision checkpoint, then quantize")
    model = load_model(model_dir, torch.float32, torch.device("cpu"))
    check_request(model.spec, cfg)  # before calibration costs anything
    tok = load_tokenizer(model_dir)
    importance = _calibrate(model, tok, calibration, console, show_progress) if cfg.needs_importance else None
    plan = plan_pruning(model.spec, cfg, importance)
    pruned, new_config = apply_plan(model, config, plan)
    before, after = (sum(p.numel() for p in m.parameters()) for m in (model, pruned))
    console.print(
        f"pruned {model_dir.name}: {before:,} -> {after:,} parameters ({100 * (1 - after / before):.1f}% fewer); "
        f"layers {list(plan.keep_layers)} of {model.spec.num_layers}, {plan.num_heads}/{model.spec.num_heads} heads "
        f"({plan.num_kv_heads} KV), MLP {plan.intermediate_size}/{model.spec.intermediate_size}",
        highlight=False,
    )
    record = json.dumps(_pruning_record(model_dir, cfg, plan, importance, before, after), indent=2) + "\n"
    save_dtype = config.get("torch_dtype") if config.get("torch_dtype") in SAVE_DTYPES else "float32"
    output = OutputOptions(out=out, overwrite=overwrite, save_dtype=save_dtype, command=command)
    if heal is not None:
        context_len = heal.context_len or min(model.max_len, 256)
        student = StudentInit(new_config, shape_of_config(new_config, context_len), pruned.state_dict(),
                              f"pruned from {model_dir}")
        del model
        return distill(str(model_dir), student, heal.data, heal.train, heal.kd, output, device,
                       show_progress=show_progress, console=console, extra_files={PRUNING_FILE: record})
    return export_model(pruned, new_config, tok, out, overwrite, save_dtype,
                        {**side_files(model_dir), PRUNING_FILE: record})


def _calibrate(model, tok, calibration: Calibration | None, console: Console, show_progress: bool) -> Importance:
    if calibration is None:
        raise InvalidParameterError("choosing what to prune needs calibration text: pass --calibration FILE "
                                    "(or --data, which it then defaults to)")
    window = calibration.window or min(model.max_len, 256)
    if window > model.max_len:
        raise InvalidParameterError(f"--calibration-window {window} exceeds the model's context ({model.max_len})")
    needed = window * calibration.max_windows
    # A corpus can be megabytes; tokenize a prefix that normally covers the windows, the whole text if not.
    ids = tok(calibration.text[: needed * _CHARS_PER_TOKEN_BOUND], add_special_tokens=False, verbose=False)["input_ids"]
    if len(ids) < needed and len(calibration.text) > needed * _CHARS_PER_TOKEN_BOUND:
        ids = tok(calibration.text, add_special_tokens=False, verbose=False)["input_ids"]
    return measure_importance(model, calibration_windows(ids, window, calibration.max_windows), console,
                              show_progress)
