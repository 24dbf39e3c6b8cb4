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
    decode_tok_s: float  # one sequence, median of `repeats` (timed in turn with the variants loaded beside it)
    batch_tok_s: float  # generated tokens per second over `batch_size` sequences at once
    perplexity: float


@dataclass(frozen=True)
class _Loaded:
    """A variant loaded for measuring, with the prompts its speed is timed on."""

    variant: Variant
    llm: object  # selfhost.LLM
    prompt: list[int]  # one sequence's prompt (decode speed)
    prompts: list[list[int]]  # `batch_size` prompts (batched throughput)
    max_tokens: int
    weight_bytes: int


def _load(variant: Variant, eval_ids: list[int], settings: MeasureSettings) -> _Loaded:
    from selfhost import LLM
    from selfhost.quant.apply import weight_bytes

    llm = LLM(variant.model, device="cpu", dtype="float32", quantization=variant.quantization,
              max_num_seqs=settings.batch_size)
    return _Loaded(variant, llm, eval_ids[:16], [eval_ids[i * 16 : i * 16 + 16] for i in range(settings.batch_size)],
                   min(settings.decode_tokens, llm.max_model_len - 16), weight_bytes(llm.model))


def _interleaved_tok_s(runs: list[tuple[object, list[list[int]], int]], repeats: int) -> list[float]:
    """Generated tokens per second of each (llm, prompts, max_tokens), median of `repeats` timed runs. Each
    repeat runs every entry once, in turn: on a machine whose load drifts all entries see the same drift, so
    their ratios hold (timed one after another, a pruned model with 60% of the teacher's layer work had read
    0.89x the teacher under a load of 3-5)."""
    from selfhost import SamplingParams

    params = [SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True) for _, _, max_tokens in runs]
    for (llm, prompts, _), sampling in zip(runs, params):
        llm.generate(prompts, sampling)  # warm-up: allocator, thread pool, kernel choice
    rates: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for (llm, prompts, _), sampling, timed in zip(runs, params, rates):
            start = time.perf_counter()
            outputs = llm.generate(prompts, sampling)
            timed.append(sum(len(o.token_ids) for o in outputs) / (time.perf_counter() - start))
    return [statistics.median(timed) for timed in rates]


def _measure_group(group: list[_Loaded], eval_ids: list[int], settings: MeasureSettings) -> list[VariantRow]:
    """Rows for variants loaded together, their speeds timed interleaved."""
    from selfhost.quant.perplexity import perplexity

    decode = _interleaved_tok_s([(g.llm, [g.prompt], g.max_tokens) for g in group], settings.repeats)
    batch = _interleaved_tok_s([(g.llm, g.prompts, g.max_tokens) for g in group], max(1, settings.repeats // 2))
    return [VariantRow(
        name=g.variant.name,
        num_params=sum(p.numel() for p in g.llm.model.parameters()) if g.variant.quantization is None else None,
        weight_bytes=g.weight_bytes,
        decode_tok_s=decode_tok_s,
        batch_tok_s=batch_tok_s,
        perplexity=perplexity(g.llm.model, eval_ids, settings.ppl_window).perplexity,
    ) for g, decode_tok_s, batch_tok_s in zip(group, decode, batch)]


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
    """One row per variant; progress on `console`. Variants are loaded side by side while their weights
    fit in a quarter of the free memory, and each such group's speeds are timed interleaved
    (`_interleaved_tok_s`); past that the group is measured and dropped before the next loads."""
    from selfhost.host_memory import available_memory_bytes

    console = console or Console(stderr=True)
    budget = available_memory_bytes() // 4
    rows: list[VariantRow] = []
    group: list[_Loaded] = []
    for i, variant in enumerate(variants, start=1):
        console.print(f"[{i}/{len(variants)}] loading {variant.name} ({variant.model}"
                      f"{', ' + variant.quantization if variant.quantization else ''})...", highlight=False)
        loaded = _load(variant, eval_ids, settings)
        if group and sum(g.weight_bytes for g in group) + loaded.weight_bytes > budget:
            console.print(f"measuring {len(group)} variant(s)...", highlight=False)
            rows += _measure_group(group, eval_ids, settings)
            group = []
        group.append(loaded)
    console.print(f"measuring {len(group)} variant(s), timed in turn...", highlight=False)
    return rows + _measure_group(group, eval_ids, settings)


def frontier(rows: list[VariantRow]) -> list[str]:
    """Names of the variants that no other has both less memory and lower perplexity than, smallest first."""
    kept = [r for r in rows if not any(o.weight_bytes <= r.weight_bytes and o.perplexity <= r.perplexity
                                       and (o.weight_bytes, o.perplexity) != (r.weight_bytes, r.perplexity)
                                       for o in rows)]
    return [r.name for r in sorted(kept, key=lambda r: r.weight_bytes)]
