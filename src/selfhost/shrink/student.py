"""Which student to distill into, and the checks that make teacher and student comparable.

A fresh student is a Llama of a named size, a JSON file of ModelShape fields, or
"half": the teacher's head size and MLP ratio at about half its parameters. It
always takes the teacher's vocabulary, so the two distributions line up token by
token. A pruned student is a checkpoint folder that must share the teacher's
tokenizer exactly.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from selfhost.errors import InvalidParameterError
from selfhost.models.families import spec_from_config
from selfhost.tokenizer import TokenizerMismatchError
from selfhost.train.config import MODEL_SIZES, ModelShape

HALF = "half"
STUDENT_CHOICES = (HALF, *MODEL_SIZES)


def shape_of_config(cfg: dict, context_len: int) -> ModelShape:
    """The ModelShape of a checkpoint's config.json (any family selfhost runs), trained at `context_len`."""
    spec = spec_from_config(cfg)
    return ModelShape(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_layers=spec.num_layers, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
        context_len=context_len, rope_theta=spec.ropes[0].theta, tie_embeddings=spec.tie_embeddings,
        explicit_head_dim=spec.head_dim if spec.head_dim * spec.num_heads != spec.hidden_size else None,
    )


def half_shape(teacher: ModelShape) -> ModelShape:
    """About half the teacher's parameters: same head size and MLP ratio, fewer layers and a narrower width.

    Every width that is a multiple of the head size gets the depth that brings it
    closest to half; the closest of those wins (on a tie, the deeper one)."""
    target = teacher.num_params() / 2
    head_dim, ratio = teacher.head_dim, teacher.intermediate_size / teacher.hidden_size
    group = teacher.num_heads // teacher.num_kv_heads
    best: tuple[float, int, ModelShape] | None = None
    for heads in range(1, teacher.num_heads + 1):
        hidden = heads * head_dim
        kv_heads = heads // group if heads % group == 0 else heads
        inter = max(16, round(ratio * hidden / 16) * 16)
        width = {**_fields(teacher), "hidden_size": hidden, "intermediate_size": inter, "num_heads": heads,
                 "num_kv_heads": kv_heads, "explicit_head_dim": None}
        at_depth = lambda layers: ModelShape(**{**width, "num_layers": layers})  # noqa: E731
        per_layer = at_depth(2).num_params() - at_depth(1).num_params()
        embeddings = at_depth(1).num_params() - per_layer
        depth = max(1, min(teacher.num_layers, round((target - embeddings) / per_layer)))
        for layers in {max(1, depth - 1), depth, min(teacher.num_layers, depth + 1)}:
            shape = at_depth(layers)
            key = (abs(shape.num_params() - target), -layers)
            if best is None or key < best[:2]:
                best = (*key, shape)
    assert best is not None
    return best[2]


def _fields(shape: ModelShape) -> dict:
    return {f.name: getattr(shape, f.name) for f in fields(shape)}


def student_shape(choice: str, teacher_cfg: dict, context_len: int) -> ModelShape:
    """A fresh student's shape: `half`, a named size, or a JSON file of ModelShape fields; the teacher's vocabulary."""
    vocab = teacher_cfg["vocab_size"]
    if choice == HALF:
        return half_shape(shape_of_config(teacher_cfg, context_len))
    if choice in MODEL_SIZES:
        return ModelShape(**{**_fields(MODEL_SIZES[choice]), "vocab_size": vocab, "context_len": context_len})
    path = Path(choice)
    if not path.is_file():
        raise InvalidParameterError(
            f"--student-config {choice!r} is neither a size ({', '.join(STUDENT_CHOICES)}) nor a JSON file"
        )
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidParameterError(f"--student-config {path} is not a readable JSON file: {err}") from err
    known = {f.name for f in fields(ModelShape)}
    if not isinstance(values, dict) or set(values) - known:
        unknown = sorted(set(values) - known) if isinstance(values, dict) else ["(not an object)"]
        raise InvalidParameterError(
            f"--student-config {path}: unknown field(s) {', '.join(unknown)}; "
            f"expected a JSON object of {', '.join(sorted(known))}"
        )
    if values.get("vocab_size", vocab) != vocab:
        raise TokenizerMismatchError(
            f"--student-config {path} sets vocab_size {values['vocab_size']}, but the teacher's tokenizer has "
            f"{vocab} ids; a student shares its teacher's tokenizer, so leave vocab_size out"
        )
    return ModelShape(**{"context_len": context_len, **values, "vocab_size": vocab})
