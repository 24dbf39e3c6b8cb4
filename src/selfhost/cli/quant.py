"""`selfhost quantize`, `selfhost perplexity`, `selfhost export gguf` and `selfhost export onnx`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from selfhost.cli.console import make_console

from selfhost.errors import InvalidParameterError, SelfhostError

Model = Annotated[str, typer.Argument(help="Local folder, Hugging Face Hub id or catalog alias.")]
TextFile = Annotated[Path, typer.Option("--text", help="UTF-8 text file to score.")]

export_app = typer.Typer(help="Export a model to other runtimes' formats.", no_args_is_help=True)
err = make_console(stderr=True)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidParameterError(f"cannot read text file {path}: {e}") from e


def quantize(
    model: Model,
    method: Annotated[str, typer.Option("--method", help="int8 (per-row scales) or int4 (group-wise).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="New folder for the quantized checkpoint.")],
    group_size: Annotated[int | None, typer.Option(help="int4 group size; default: per layer, the largest of "
                                                       "128/64/32/16 that divides its inputs.")] = None,
    symmetric: Annotated[bool, typer.Option("--symmetric", help="int4: zero point fixed at 8.")] = False,
    head_method: Annotated[str | None, typer.Option(help="Embeddings and output head: int8 or int4 "
                                                         "(default: same as --method).")] = None,
    keep_head: Annotated[bool, typer.Option("--keep-head", help="Keep embeddings and output head in full "
                                                                "precision.")] = False,
    report: Annotated[bool, typer.Option("--report", help="Also compare fp32/int8/int4: memory, decode tok/s, "
                                                          "perplexity; table + PNG in the output folder.")] = False,
    text: Annotated[Path | None, typer.Option("--text", help="Text for the report's perplexity.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
) -> None:
    """Write a quantized copy of MODEL (safetensors + quantization_config in config.json)."""
    from selfhost.hub import resolve_model
    from selfhost.quant.checkpoint import quantize_checkpoint
    from selfhost.quant.config import QuantConfig

    skip = ("model.embed_tokens", "lm_head") if keep_head else ()
    config = QuantConfig(method=method, group_size=group_size, symmetric=symmetric, head_method=head_method,
                         skip_modules=skip)
    text_value = _read_text(text) if text is not None else None
    model_dir = resolve_model(model)
    plan = quantize_checkpoint(model_dir, out, config, overwrite=force)
    groups = "" if not config.uses_groups else (
        f", group size {group_size}" if group_size else ", group size per layer (largest of 128/64/32/16 dividing it)")
    err.print(f"wrote {out} ({method}{groups}; {len(plan)} modules quantized)")
    if report:
        from selfhost.quant import report as rep

        other = QuantConfig(method="int4" if method == "int8" else "int8", skip_modules=skip)
        variants = {"fp32": None, method: config, other.method: other}
        results = rep.measure(str(model_dir), text_value, {k: variants[k] for k in ("fp32", "int8", "int4")})
        rep.print_table(results)
        err.print(f"plot: {rep.plot(results, out / 'quantization_report.png')}")


def perplexity(
    model: Model,
    text: TextFile,
    quantization: Annotated[str | None, typer.Option(help="Quantize on the fly: int8 or int4.")] = None,
    window: Annotated[int | None, typer.Option(help="Tokens per window (default: min(context, 512)).")] = None,
    stride: Annotated[int | None, typer.Option(help="Tokens the window advances (default: window / 2).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
) -> None:
    """Sliding-window perplexity of MODEL on a text file."""
    from selfhost import LLM
    from selfhost.quant.perplexity import encode_text, perplexity as compute

    content = _read_text(text)
    llm = LLM(model, device=device, quantization=quantization, max_num_seqs=1)
    result = compute(llm.model, encode_text(llm.tokenizer, content), window, stride)
    print(f"perplexity {result.perplexity:.4f}  ({result.num_tokens} tokens, window {result.window}, "
          f"stride {result.stride}, mean NLL {result.mean_nll:.4f} nats)")


@export_app.command("gguf")
def export_gguf(
    model: Model,
    out: Annotated[Path, typer.Option("--out", "-o", help="Path of the .gguf file to write.")],
    type_: Annotated[str, typer.Option("--type", help="f16, q8_0 or q4_0.")] = "f16",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
) -> None:
    """Write MODEL as a GGUF file for llama.cpp / Ollama."""
    from selfhost.hub import resolve_model

    try:
        from selfhost.quant.gguf_export import export_gguf as export
    except ModuleNotFoundError as e:
        raise SelfhostError(f"GGUF export needs the {e.name!r} package: pip install 'selfhost[gguf]'") from e

    types = export(resolve_model(model), out, type_, overwrite=force)
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t.name] = counts.get(t.name, 0) + 1
    summary = ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
    err.print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB; tensors: {summary})")


@export_app.command("onnx")
def export_onnx(
    model: Model,
    out: Annotated[Path, typer.Option("--out", "-o", help="New folder for the ONNX model (must not exist).")],
    dtype: Annotated[str, typer.Option(help="fp32 or fp16: activations, KV cache and unquantized weights.")] = "fp32",
    quant: Annotated[str | None, typer.Option(help="int4 or int8: weights as MatMulNBits blocks.")] = None,
) -> None:
    """Write MODEL as an ONNX decoder folder for ONNX Runtime and onnxruntime-genai (docs/ONNX.md)."""
    from selfhost.hub import resolve_model

    try:
        from selfhost.onnx.export import export_onnx as export
        from selfhost.onnx.export_info import OnnxExportConfig
    except ModuleNotFoundError as e:
        raise SelfhostError(f"ONNX export needs the {e.name!r} package: pip install 'selfhost[onnx]'") from e

    config = OnnxExportConfig(dtype=dtype, quant=quant)
    result = export(resolve_model(model), out, config)
    info = result.info
    weights = f", {info.quant} weights" if info.quant else ""
    err.print(f"wrote {out} ({info.architecture}, {info.dtype}{weights}, {info.attention} attention; "
              f"graph {result.graph_bytes / 1e3:.0f} kB, weights {result.weight_bytes / 1e6:.1f} MB)")


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize)
    app.command("perplexity")(perplexity)
    app.add_typer(export_app, name="export")
