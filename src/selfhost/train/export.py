"""Write a trained model as a standard Hugging Face folder, all or nothing.

Fused `qkv_proj` / `gate_up_proj` weights are split back into the checkpoint
names transformers expects. Everything is written into a hidden temporary
folder next to the target and renamed into place at the end, so an error or
Ctrl-C never leaves a half-written model under the real name.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from selfhost.errors import SelfhostError
from selfhost.models.decoder import CausalLM
from selfhost.models.families import PACKED_WEIGHTS
from selfhost.models.loader import shard_slices

# Messages render like speeches in a play, the only format the demo model knows.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }}:\n{{ message['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:\n{% endif %}"
)

SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class OutputExistsError(SelfhostError):
    """The output folder exists and --overwrite was not given."""


def check_output(out: Path, overwrite: bool) -> None:
    """Fail before any work is done if `out` would be clobbered without permission."""
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output folder {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {out} exists and is not a folder")


def hf_state_dict(model: CausalLM, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our module names -> transformers' checkpoint names, fused weights split."""
    slices = shard_slices(model.spec)
    unpacked: dict[str, list[str]] = {}
    for hf_name, (fused, shard) in PACKED_WEIGHTS.items():
        unpacked.setdefault(fused, [None] * len(slices[fused]))[shard] = hf_name
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.spec.tie_embeddings:
            continue  # transformers re-ties it from embed_tokens
        module_path, _, leaf = name.rpartition(".")
        parent, _, module = module_path.rpartition(".")
        if module in unpacked:
            for hf_name, (start, end) in zip(unpacked[module], slices[module]):
                out[f"{parent}.{hf_name}.{leaf}"] = tensor[start:end].to(dtype).contiguous()
        else:
            out[name] = tensor.to(dtype).contiguous()
    return out


def tokenizer_config(tok, context_len: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "pad_token": tok.pad_token,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_len,
        "chat_template": CHAT_TEMPLATE,
    }


def generation_config(model_config: dict) -> dict:
    return {
        "bos_token_id": model_config["bos_token_id"],
        "eos_token_id": model_config["eos_token_id"],
        "pad_token_id": model_config["pad_token_id"],
        "do_sample": True,
        "temperature": 0.8,
        "top_p": 0.95,
    }


def export_model(
    model: CausalLM,
    model_config: dict,
    tok,
    out: Path,
    overwrite: bool,
    save_dtype: str = "float32",
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write config, weights, tokenizer and `extra_files` (name -> text) to `out`."""
    from safetensors.torch import save_file

    if save_dtype not in SAVE_DTYPES:
        raise SelfhostError(f"save dtype {save_dtype!r} is not supported; choose one of {', '.join(SAVE_DTYPES)}")
    with staged_folder(out, overwrite) as staging:
        config = {**model_config, "torch_dtype": save_dtype}
        files = {
            "config.json": config,
            "generation_config.json": generation_config(model_config),
            "tokenizer_config.json": tokenizer_config(tok, model_config["max_position_embeddings"]),
        }
        for name, content in files.items():
            (staging / name).write_text(json.dumps(content, indent=2) + "\n")
        (staging / "tokenizer.json").write_text(tok.backend_tokenizer.to_str())
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
        save_file(hf_state_dict(model, SAVE_DTYPES[save_dtype]), str(staging / "model.safetensors"),
                  metadata={"format": "pt"})
    return out


@contextmanager
def staged_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty staging folder next to `out`; on success it becomes `out` (all or nothing), on any
    error it disappears. Checks `out` first, so a refused overwrite costs no work."""
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
        # mkdtemp makes a private folder; a model or adapter is ordinary data (and may ship in a package).
        staging.chmod(0o755)
        for file in staging.iterdir():
            file.chmod(0o644)
        _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_into_place(staging: Path, out: Path) -> None:
    if not out.exists():
        staging.rename(out)
        return
    # --overwrite: move the old folder aside first, so a failed rename can be undone.
    old = out.with_name(f".{out.name}.old-{staging.name.rsplit('-', 1)[-1]}")
    out.rename(old)
    try:
        staging.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
