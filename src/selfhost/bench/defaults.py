"""Default prompt and reply lengths, fitted to the served model's context window.

256 prompt + 128 reply tokens suit chat models, but a small model rejects them:
the demo model's 256-token window would fail every request. When the endpoint
reports its context (`max_model_len` in /v1/models, or the in-process engine's)
and a default does not fit, the defaults shrink, in the same 2:1 ratio, to half
the window; the other half covers the chat template and words that take more than
one token in a small vocabulary. Lengths the user chose are kept, with a warning
when they can overflow the window.
"""

from __future__ import annotations

from dataclasses import dataclass

from selfhost.bench.dist import parse_length_dist

DEFAULT_PROMPT_TOKENS = 256
DEFAULT_OUTPUT_TOKENS = 128


@dataclass(frozen=True)
class Lengths:
    """The prompt and output DIST strings a run uses, and a line for the console when they
    are not what the user would expect (shrunk defaults, or lengths that overflow the context)."""

    prompt: str
    output: str
    note: str | None = None


def choose_lengths(
    prompt: str | None, output: str | None, context_tokens: int | None, model: str, dataset: bool = False
) -> Lengths:
    """`prompt`/`output` are the user's DIST strings, None when not given; `dataset`: prompts come from a file."""
    default_prompt, default_output = DEFAULT_PROMPT_TOKENS, DEFAULT_OUTPUT_TOKENS
    shrunk = context_tokens is not None and (prompt is None or output is None) and \
        default_prompt + default_output > context_tokens // 2
    if shrunk:
        budget = context_tokens // 2
        default_prompt = max(1, budget * 2 // 3)
        default_output = max(1, budget - default_prompt)
    chosen = Lengths(prompt or f"fixed:{default_prompt}", output or f"fixed:{default_output}")
    if context_tokens is None or dataset:  # a file's prompts have no planned length to check
        return chosen
    longest = parse_length_dist(chosen.prompt).upper + parse_length_dist(chosen.output).upper
    if longest > context_tokens:
        note = (f"warning: prompts ({chosen.prompt}) plus replies ({chosen.output}) reach {longest} tokens, over "
                f"the {context_tokens}-token context of model {model!r}: such requests will fail")
    elif shrunk:
        note = (f"lengths fitted to the {context_tokens}-token context of model {model!r}: prompt {chosen.prompt}, "
                f"output {chosen.output} (defaults fixed:{DEFAULT_PROMPT_TOKENS} + fixed:{DEFAULT_OUTPUT_TOKENS}; "
                "set --prompt-tokens / --output-tokens to choose)")
    else:
        note = None
    return Lengths(chosen.prompt, chosen.output, note)
