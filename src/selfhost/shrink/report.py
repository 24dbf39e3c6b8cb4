"""Every way to shrink, side by side: weight memory, decode speed, batched throughput, perplexity.

A variant is the base model at full precision (`fp32`), the base quantized on the
fly (`int8`, `int4`), another checkpoint folder (a pruned or distilled model), or
such a folder quantized on the fly (`PRUNED+int8`). All of them must share the
base model's tokenizer, so their perplexities are per the same token and compare.
The frontier is the set of variants no other beats on both memory and perplexity:
the ones an operator picks from.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from selfhost.errors import InvalidParameterError
from selfhost.quant.config import METHODS

FULL_PRECISION = "fp32"
DEFAULT_VARIANTS = f"{FULL_PRECISION},int8,int4"


@dataclass(frozen=True)
class Variant:
    name: str
    model: str  # model reference (folder, Hub id, alias)
    quantization: str | None  # quantized on the fly after loading


def parse_variants(spec: str, base_model: str) -> list[Variant]:
    """`fp32,int8,int4,FOLDER,FOLDER+int8` -> variants; names are unique."""
    variants = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            raise InvalidParameterError(f"--variants {spec!r} has an empty entry; separate names with single commas")
        if item == FULL_PRECISION:
            variants.append(Variant(item, base_model, None))
        elif item in METHODS:
            variants.append(Variant(item, base_model, item))
        else:
            model, plus, method = item.rpartition("+")
            if plus and method in METHODS:
                variants.append(Variant(f"{Path(model).name}+{method}", model, method))
            else:
                variants.append(Variant(Path(item).name, item, None))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise InvalidParameterError(f"--variants {spec!r} names a variant twice ({', '.join(names)})")
    return variants


@dataclass(frozen=True)
class MeasureSettings:
    decode_tokens: int = 64
    repeats: int = 3  # timed runs per speed figure; the median is reported
    batch_size: int = 16  # sequences decoded together for the throughput figure
    ppl_window: int | None = None  # None: min(context, 512)

    def __post_init__(self):
        for name in ("decode_tokens", "repeats", "batch_size"):
            if getattr(self, name) < 1:
                raise InvalidParameterError(f"{name}={getattr(self, name)} must be at least 1")


@dataclass(frozen=True)
class VariantRow:
    name: str
    num_params: int | None  # None where quantized modules hold the weights
    weight_bytes: int
    decode_tok_s: float  # one sequence, median of `repeats`
    batch_tok_s: float  # generated tokens per second over `batch_size` sequences at once
    perplexity: float


def _generation_tok_s(llm, prompts: list[list[int]], max_tokens: int, repeats: int) -> float:
    from selfhost import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    llm.generate(prompts, params)  # warm-up: allocator, thread pool, kernel choice
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = llm.generate(prompts, params)
        rates.append(sum(len(o.token_ids) for o in outputs) / (time.perf_counter() - start))
    return statistics.median(rates)


def measure_variant(variant: Variant, eval_ids: list[int], settings: MeasureSettings) -> VariantRow:
    from selfhost import LLM
    from selfhost.quant.apply import weight_bytes
    from selfhost.quant.perplexity import perplexity

    llm = LLM(variant.model, device="cpu", dtype="float32", quantization=variant.quantization,
              max_num_seqs=settings.batch_size)
    prompt = eval_ids[:16]
    prompts = [eval_ids[i * 16 : i * 16 + 16] for i in range(settings.batch_size)]
    tokens = min(settings.decode_tokens, llm.max_model_len - 16)
    return VariantRow(
        name=variant.name,
        num_params=sum(p.numel() for p in llm.model.parameters()) if variant.quantization is None else None,
        weight_bytes=weight_bytes(llm.model),
        decode_tok_s=_generation_tok_s(llm, [prompt], tokens, settings.repeats),
        batch_tok_s=_generation_tok_s(llm, prompts, tokens, max(1, settings.repeats // 2)),
        perplexity=perplexity(llm.model, eval_ids, settings.ppl_window).perplexity,
    )


def check_shared_tokenizer(variants: list[Variant]) -> None:
    from selfhost.hub import resolve_model
    from selfhost.tokenizer import TokenizerMismatchError
    from selfhost.train.data import load_tokenizer

    vocabularies = {}
    for v in variants:
        folder = resolve_model(v.model)
        if folder not in vocabularies:
            vocabularies[folder] = load_tokenizer(folder).get_vocab()
    base_folder, base = next(iter(vocabularies.items()))
    for folder, vocab in vocabularies.items():
        if vocab != base:
            raise TokenizerMismatchError(
                f"{folder} does not share {base_folder}'s tokenizer: perplexities per token would not compare"
            )


def eval_token_ids(variants: list[Variant], text: str, settings: MeasureSettings) -> list[int]:
    """The held-out text in the (shared) tokenizer's ids; refuses text too short for the prompts."""
    from selfhost.hub import resolve_model
    from selfhost.train.data import load_tokenizer

    check_shared_tokenizer(variants)
    tok = load_tokenizer(resolve_model(variants[0].model))
    ids = tok(text, add_special_tokens=True, verbose=False)["input_ids"]
    needed = 16 * settings.batch_size
    if len(ids) < needed:
        raise InvalidParameterError(f"--text holds {len(ids)} tokens; the report needs at least {needed} "
                                    f"({settings.batch_size} prompts of 16 tokens)")
    return ids


def measure_all(variants: list[Variant], eval_ids: list[int], settings: MeasureSettings,
                console: Console | None = None) -> list[VariantRow]:
    """One row per variant, each loaded afresh; progress on `console`."""
    console = console or Console(stderr=True)
    rows = []
    for i, variant in enumerate(variants, start=1):
        console.print(f"[{i}/{len(variants)}] measuring {variant.name} ({variant.model}"
                      f"{', ' + variant.quantization if variant.quantization else ''})...", highlight=False)
        rows.append(measure_variant(variant, eval_ids, settings))
    return rows


def frontier(rows: list[VariantRow]) -> list[str]:
    """Names of the variants that no other has both less memory and lower perplexity than, smallest first."""
    kept = [r for r in rows if not any(o.weight_bytes <= r.weight_bytes and o.perplexity <= r.perplexity
                                       and (o.weight_bytes, o.perplexity) != (r.weight_bytes, r.perplexity)
                                       for o in rows)]
    return [r.name for r in sorted(kept, key=lambda r: r.weight_bytes)]
