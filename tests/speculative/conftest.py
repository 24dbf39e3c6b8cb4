"""Draft models for the speculative tests: noisy copies of a tiny target, which share its tokenizer."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from selfhost.speculative.speculator import Speculator


def always(llm):
    """`llm` proposing whenever a sequence's adaptive length allows, whatever this machine's step times say:
    the tests need speculation to happen (and be rejected and accepted) on a fast machine and a slow one."""
    current = llm.engine.speculator
    llm.engine.speculator = Speculator(dataclasses.replace(current.config, when="always"), current.draft)
    return llm


@pytest.fixture(scope="module")
def target(tiny_checkpoint):
    """The model the speculative tests decode with (proposals are checked against it)."""
    return str(tiny_checkpoint("llama"))


@pytest.fixture(scope="session")
def noisy_copy(tmp_path_factory):
    """Factory: `target`'s folder with Gaussian noise (`noise` x each matrix's std) on its weight matrices."""

    def build(target: str, noise: float, seed: int) -> str:
        from safetensors.torch import load_file, save_file

        folder = tmp_path_factory.mktemp(f"noisy-{seed}")
        shutil.copytree(target, folder, dirs_exist_ok=True)
        weights = load_file(folder / "model.safetensors")
        generator = torch.Generator().manual_seed(seed)
        save_file({name: w + noise * w.std() * torch.randn(w.shape, generator=generator) if w.dim() == 2 else w
                   for name, w in weights.items()}, folder / "model.safetensors", metadata={"format": "pt"})
        return str(folder)

    return build
