"""`selfhost run` (one prompt, streamed) and `selfhost chat` (interactive)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from selfhost.cli.console import make_console

from selfhost.cli import options as o
from selfhost.errors import InvalidParameterError


def run(
    args: Annotated[list[str], typer.Argument(metavar="[MODEL] PROMPT", help="Model (optional) and prompt.")],
    max_tokens: o.MaxTokens = 200,
    temperature: o.Temperature = 0.8,
    top_p: o.TopP = 0.95,
    top_k: o.TopK = None,
    min_p: o.MinP = 0.0,
    repetition_penalty: o.RepetitionPenalty = 1.0,
    seed: o.Seed = None,
    stop: o.Stop = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template.")] = False,
    dtype: o.Dtype = "auto",
    weight_dtype: o.WeightDtype = "auto",
    kv_cache_dtype: o.KvCacheDtype = "auto",
    device: o.Device = "auto",
    allow_pickle: o.AllowPickle = False,
    transformers_fallback: o.TransformersFallback = False,
    speculative: o.Speculative = None,
    num_speculative_tokens: o.NumSpeculativeTokens = 4,
) -> None:
    """Generate a continuation of PROMPT and stream it to the terminal.

    MODEL is a local folder, a Hugging Face Hub id or a catalog alias; without
    it the embedded demo model (small, Shakespeare-trained) is used.
    """
    if len(args) > 2:
        raise InvalidParameterError(f"expected [MODEL] PROMPT, got {len(args)} arguments; quote the prompt")
    model, prompt = (None, args[0]) if len(args) == 1 else (args[0], args[1])
    params = o.sampling_params(max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop)
    llm = o.load_llm(model, dtype, device, allow_pickle, transformers_fallback, weight_dtype, kv_cache_dtype,
                     speculative, num_speculative_tokens)
    source = llm.tokenizer.encode_chat([{"role": "user", "content": prompt}]) if chat else prompt
    if not chat:
        sys.stdout.write(prompt)
    for delta in llm.stream(source, params):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")


def chat(
    model: Annotated[str | None, typer.Argument(help="Model; default: the embedded demo model.")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    max_tokens: o.MaxTokens = 512,
    temperature: o.Temperature = 0.8,
    top_p: o.TopP = 0.95,
    top_k: o.TopK = None,
    min_p: o.MinP = 0.0,
    repetition_penalty: o.RepetitionPenalty = 1.0,
    seed: o.Seed = None,
    stop: o.Stop = None,
    dtype: o.Dtype = "auto",
    weight_dtype: o.WeightDtype = "auto",
    kv_cache_dtype: o.KvCacheDtype = "auto",
    device: o.Device = "auto",
    allow_pickle: o.AllowPickle = False,
    transformers_fallback: o.TransformersFallback = False,
    speculative: o.Speculative = None,
    num_speculative_tokens: o.NumSpeculativeTokens = 4,
) -> None:
    """Chat with a model in the terminal. Empty line or Ctrl-D quits; /reset clears the history."""
    params = o.sampling_params(max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop)
    llm = o.load_llm(model, dtype, device, allow_pickle, transformers_fallback, weight_dtype, kv_cache_dtype,
                     speculative, num_speculative_tokens)
    console = make_console()
    history = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            user = console.input("[bold green]you>[/] ")
        except EOFError:
            break
        if not user.strip():
            break
        if user.strip() == "/reset":
            history = history[:1] if system else []
            continue
        history.append({"role": "user", "content": user})
        console.print("[bold blue]model>[/] ", end="")
        reply = []
        for delta in llm.stream(llm.tokenizer.encode_chat(history), params):
            reply.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("chat")(chat)
