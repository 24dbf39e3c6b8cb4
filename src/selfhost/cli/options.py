"""Options shared by the commands that load a model and sample from it.

Declared once here so `run`, `chat` and later `serve` read the same flags with
the same defaults and help text.
"""

from __future__ import annotations

import re
from typing import Annotated

import typer

from selfhost.sampling_params import SamplingParams

MaxTokens = Annotated[int, typer.Option("--max-tokens", "-n", help="Most tokens to generate.")]
Temperature = Annotated[float, typer.Option(help="0 = greedy; higher = more random.")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling: keep the smallest set of tokens with this mass.")]
TopK = Annotated[int | None, typer.Option(help="Keep only the k most likely tokens.")]
MinP = Annotated[float, typer.Option(help="Drop tokens less likely than min-p x the most likely one.")]
RepetitionPenalty = Annotated[float, typer.Option(help="> 1 discourages repeating prompt and output tokens.")]
Seed = Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")]
Stop = Annotated[list[str] | None, typer.Option(help=r"Stop when this text appears (repeatable). \n, \t, \r and \\ "
                                                   r"are read as escapes: --stop '\n\n' stops at a blank line.")]
Dtype = Annotated[str, typer.Option(help="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")]
WeightDtype = Annotated[
    str,
    typer.Option(help="auto: bf16 linear weights where that measures faster on this CPU (activations stay fp32); "
                 "bfloat16; float32: the weights as loaded (exact parity with transformers)."),
]
KvCacheDtype = Annotated[
    str, typer.Option(help="auto (bf16 under bf16 weights, and under quantized ones on CPUs with AMX; else the model's dtype), bfloat16, float32, int8 (a "
                      "quarter of fp32's bytes plus a scale per token and head; not exact)."),
]
Speculative = Annotated[
    str | None,
    typer.Option(help="Speculative decoding: 'ngram' (prompt lookup) or 'draft:PATH' (a smaller model with the same "
                 "tokenizer). Same output, faster where proposals are accepted."),
]
NumSpeculativeTokens = Annotated[int, typer.Option(help="Most tokens proposed per step with --speculative.")]
AllowPickle = Annotated[
    bool, typer.Option("--allow-pickle", help="Allow pickled .bin weights (can run code; trust the source).")
]


def sampling_params(
    max_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int | None,
    min_p: float,
    repetition_penalty: float,
    seed: int | None,
    stop: list[str] | None,
) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=tuple(unescape(s) for s in stop or ()),
    )


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)


def unescape(text: str) -> str:
    """Read \\n, \\t, \\r and \\\\ the way a user typing them in a shell means them; other backslashes stay."""
    return _ESCAPE.sub(lambda m: _ESCAPES.get(m[1], m[0]), text)


TransformersFallback = Annotated[
    bool,
    typer.Option(
        "--transformers-fallback",
        help="Run an architecture without native support through transformers' modeling code (slower).",
    ),
]


def load_llm(model: str | None, dtype: str, device: str, allow_pickle: bool, transformers_fallback: bool = False,
             weight_dtype: str | None = None, kv_cache_dtype: str = "auto", speculative: str | None = None,
             num_speculative_tokens: int = 4):
    from selfhost.cli.console import make_console

    from selfhost import LLM

    make_console(stderr=True).print(f"loading {model or 'the embedded demo model'}...", style="dim")
    return LLM(model, dtype=dtype, device=device, allow_pickle=allow_pickle, transformers_fallback=transformers_fallback,
               weight_dtype=weight_dtype, kv_cache_dtype=kv_cache_dtype, speculative=speculative,
               num_speculative_tokens=num_speculative_tokens)
