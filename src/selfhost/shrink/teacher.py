"""The teacher: a checkpoint run by selfhost's own decoder, in inference mode, for training batches.

It never trains, so it runs without autograd and, on CPU, on selfhost's inference
kernels (the same ones `selfhost run` uses) with all of torch's threads.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from selfhost.errors import InvalidParameterError
from selfhost.models.loader import load_model, read_config, weight_files
from selfhost.shrink.kd_loss import TeacherTargets, teacher_logprobs
from selfhost.train.attention import BatchCausalAttention

_FINGERPRINT_BYTES = 1 << 20


def model_fingerprint(model_dir: Path) -> str:
    """Identifies a checkpoint cheaply: its config and, per weight file, its name, size and first MiB.

    Enough to notice a different or retrained teacher; not a proof against a crafted file."""
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for path in weight_files(model_dir, allow_pickle=False):
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
        with path.open("rb") as f:
            digest.update(f.read(_FINGERPRINT_BYTES))
    return digest.hexdigest()[:16]


class Teacher:
    """Logits of a frozen model for (B, T) batches of token ids."""

    def __init__(self, model_dir: Path, device: torch.device):
        self.model_dir = model_dir
        self.config = read_config(model_dir)
        # fp32 weights exactly as stored: the student learns the teacher itself, not an approximation of it.
        self.model = load_model(model_dir, torch.float32, device)
        self.vocab_size = self.model.spec.vocab_size
        self.max_len = self.model.max_len
        self.fingerprint = model_fingerprint(model_dir)

    def check_context(self, context_len: int) -> None:
        if context_len > self.max_len:
            raise InvalidParameterError(
                f"--context-len {context_len} is longer than the teacher's context ({self.max_len} tokens)"
            )

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B*T, V) fp32 logits, an ordinary tensor autograd may read."""
        B, T = inputs.shape
        with torch.inference_mode():
            positions = torch.arange(T, device=inputs.device).repeat(B)  # (B*T,)
            hidden = self.model(inputs.reshape(-1), positions, BatchCausalAttention(B, T), torch.get_num_threads())
            logits = self.model.compute_logits(hidden, torch.get_num_threads())  # (B*T, V)
        return logits.clone()  # inference tensors cannot be saved for backward; a clone can

    def targets(self, inputs: torch.Tensor, temperature: float) -> TeacherTargets:
        return TeacherTargets(teacher_logprobs(self.logits(inputs), temperature))
