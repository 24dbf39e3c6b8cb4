"""DistillTrainer: train/'s loop (schedule, clipping, accumulation, validation, checkpoints,
exact resume) with the student's loss taken against a teacher.

Only two things differ from `Trainer`: batches come from the fixed window grid
(grid.py), so cached and live teacher targets agree, and each micro-batch's
loss is kd_loss.distillation_loss. Validation stays the hard next-token loss:
perplexity on held-out text is what a distilled model is judged by.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from selfhost.shrink.grid import GridSampler, windows_at
from selfhost.shrink.kd_loss import DistillConfig, distillation_loss
from selfhost.shrink.teacher import Teacher
from selfhost.shrink.teacher_cache import TeacherCache
from selfhost.train.config import ModelShape, TrainConfig
from selfhost.train.data import TokenSplit
from selfhost.train.trainer import Trainer


class DistillTrainer(Trainer):
    def __init__(
        self,
        model_config: dict,
        shape: ModelShape,
        cfg: TrainConfig,
        split: TokenSplit,
        device: torch.device,
        kd: DistillConfig,
        teacher: Teacher | None,
        cache: TeacherCache | None = None,
        initial_weights: dict[str, torch.Tensor] | None = None,
        checkpoint_dir: Path | None = None,
        meta: dict | None = None,
        console: Console | None = None,
    ):
        assert teacher is not None or not kd.uses_teacher, "alpha > 0 needs a teacher"
        super().__init__(model_config, shape, cfg, split, device, checkpoint_dir, meta, console=console)
        if initial_weights is not None:  # a pruned student starts from its weights, not a random init
            self.model.load_state_dict(initial_weights)
        self.sampler = GridSampler(len(split.train), shape.context_len, cfg.batch_size, cfg.seed)
        self.kd, self.teacher, self.cache = kd, teacher, cache

    def _micro_batch_loss(self) -> torch.Tensor:
        starts = self.sampler.next_starts()
        inputs, targets = windows_at(self.train_tokens, starts, self.shape.context_len)
        logits = self._logits(inputs)  # (B*T, vocab)
        teacher = None
        if self.kd.uses_teacher:
            teacher = (self.cache.targets(starts, self.device) if self.cache is not None
                       else self.teacher.targets(inputs, self.kd.temperature))
        return distillation_loss(logits, targets.reshape(-1), teacher, self.kd)

    @torch.no_grad()
    def teacher_val_loss(self) -> float | None:
        """The teacher's next-token loss on the student's validation windows (None without a teacher)."""
        if self.teacher is None:
            return None
        total, count = 0.0, 0
        for chunk in self.val_windows.split(self.cfg.batch_size):
            logits = self.teacher.logits(chunk[:, :-1])
            total += torch.nn.functional.cross_entropy(logits, chunk[:, 1:].reshape(-1), reduction="sum").item()
            count += chunk[:, 1:].numel()
        return total / count
