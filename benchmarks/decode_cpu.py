"""Single-stream greedy decode: selfhost vs transformers `generate`, same weights, same run.

    python benchmarks/decode_cpu.py [--tokens 128] [--threads 2] [--repeats 3]

Prints tokens/s for each and the ratio (issue target: selfhost >= 2.5x).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import selfhost  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import build_llama_125m, timed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--weight-dtype", default=None, help="bfloat16: selfhost keeps linear weights in bf16")
    ap.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "selfhost-bench-llama125m")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    from selfhost import LLM, SamplingParams

    model_dir = build_llama_125m(args.model_dir)
    prompt = torch.randint(3, 32000, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf_input = torch.tensor([prompt])

    def hf_generate():
        with torch.inference_mode():
            out = hf.generate(
                hf_input,
                attention_mask=torch.ones_like(hf_input),
                max_new_tokens=args.tokens,
                min_new_tokens=args.tokens,
                do_sample=False,
                pad_token_id=0,
            )
        return out[0, len(prompt) :].tolist()

    llm = LLM(str(model_dir), device="cpu", weight_dtype=args.weight_dtype)
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)

    def selfhost_generate():
        return llm.generate([prompt], params)[0].token_ids

    hf_generate(), selfhost_generate()  # warm-up: allocator, thread pools
    results = {"transformers": [], "selfhost": []}
    outputs = {}
    for _ in range(args.repeats):  # interleave so both see the same machine state
        for name, fn in (("transformers", hf_generate), ("selfhost", selfhost_generate)):
            seconds, tokens = timed(fn)
            results[name].append(len(tokens) / seconds)
            outputs[name] = tokens

    best = {name: max(v) for name, v in results.items()}
    print(f"model: Llama-shaped {sum(p.numel() for p in hf.parameters()) / 1e6:.0f}M params, fp32, "
          f"{args.threads} threads, prompt {args.prompt_tokens} tokens, {args.tokens} new tokens, best of {args.repeats}")
    for name, tok_s in best.items():
        print(f"  {name:13s} {tok_s:7.1f} tok/s   (runs: {', '.join(f'{x:.1f}' for x in results[name])})")
    print(f"  ratio selfhost/transformers: {best['selfhost'] / best['transformers']:.2f}x (target >= 2.5x)")
    same = outputs["selfhost"] == outputs["transformers"]
    print(f"  greedy tokens identical: {same}")
    stats = llm.engine.stats()
    print(f"  selfhost settled on {stats.cpu_threads_small_steps} BLAS thread(s) for decode steps")


if __name__ == "__main__":
    main()
