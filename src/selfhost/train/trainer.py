"""The training loop: AdamW, warm-up + cosine decay, clipping, accumulation,
periodic validation, and checkpoints that resume bit for bit.

A checkpoint holds everything the next step depends on: weights, AdamW
moments, the scheduler's step, every RNG state and the sampler's position.
Loading one and running to the end gives the same weights as never stopping
(on the same device, torch build and thread count).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from selfhost.train.attention import BatchCausalAttention
from selfhost.train.config import ModelShape, TrainConfig
from selfhost.train.data import BatchSampler, TokenSplit, val_windows
from selfhost.train.model import build_model

CHECKPOINT_VERSION = 1


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at `step`: linear warm-up, then cosine down to min_lr_ratio."""
    warmup = cfg.num_warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.max_steps - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


@dataclass(frozen=True)
class EvalPoint:
    step: int
    train_loss: float
    val_loss: float
    tokens_seen: int
    elapsed_s: float

    @property
    def val_ppl(self) -> float:
        return math.exp(self.val_loss)


def _rng_state() -> dict:
    # Plain types and tensors only, so checkpoints load with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.copy()), pos, has_gauss, cached)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Trains one model on one token split; `meta` rides along in every checkpoint."""

    def __init__(
        self,
        model_config: dict,
        shape: ModelShape,
        cfg: TrainConfig,
        split: TokenSplit,
        device: torch.device,
        checkpoint_dir: Path | None = None,
        meta: dict | None = None,
        keep_checkpoints: int = 2,
        console: Console | None = None,
    ):
        self.model_config, self.shape, self.cfg, self.split, self.device = model_config, shape, cfg, split, device
        self.checkpoint_dir, self.meta, self.keep_checkpoints = checkpoint_dir, meta or {}, keep_checkpoints
        self.console = console or Console(stderr=True)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        self.model = build_model(model_config, cfg.seed, device).train()
        self.optimizer = torch.optim.AdamW(
            self._param_groups(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, foreach=True
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.sampler = BatchSampler(len(split.train), shape.context_len, cfg.batch_size, cfg.seed)
        self.train_tokens = split.train.to(device)
        self.val_windows = val_windows(split.val, shape.context_len, cfg.eval_tokens).to(device)
        self.step = 0
        self.tokens_seen = 0
        self.elapsed_s = 0.0
        self.history: list[EvalPoint] = []
        self.last_train_loss = float("nan")

    def _param_groups(self) -> list[dict]:
        # Decay matrices only: norm gains pulled towards 0 would fight the normalisation.
        decay, no_decay = [], []
        for _, param in self.model.named_parameters():
            (decay if param.dim() >= 2 else no_decay).append(param)
        return [
            {"params": decay, "weight_decay": self.cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def _logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B*T, vocab) fp32 logits."""
        B, T = inputs.shape
        positions = torch.arange(T, device=inputs.device).repeat(B)  # (B*T,)
        hidden = self.model(inputs.reshape(-1), positions, BatchCausalAttention(B, T))  # (B*T, hidden)
        return self.model.compute_logits(hidden)

    def _loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self._logits(inputs), targets.reshape(-1))

    def _micro_batch_loss(self) -> torch.Tensor:
        """The training loss of the next micro-batch; subclasses (distillation) change what is minimised."""
        inputs, targets = self.sampler.next_batch(self.train_tokens)
        return self._loss(inputs, targets)

    def train_step(self) -> float:
        """One optimizer step over grad_accum micro-batches; returns the mean loss."""
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for _ in range(self.cfg.grad_accum):
            loss = self._micro_batch_loss() / self.cfg.grad_accum
            loss.backward()
            total += loss.detach()
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.tokens_seen += self.cfg.tokens_per_step * self.shape.context_len
        return total.item()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token loss (nats) over the fixed validation windows."""
        self.model.eval()
        total, count = 0.0, 0
        for chunk in self.val_windows.split(self.cfg.batch_size):
            inputs, targets = chunk[:, :-1], chunk[:, 1:]
            total += self._loss(inputs, targets).item() * targets.numel()
            count += targets.numel()
        self.model.train()
        return total / count

    def run(self, show_progress: bool = True) -> list[EvalPoint]:
        """Train to cfg.max_steps, evaluating and checkpointing on schedule."""
        cfg = self.cfg
        columns = [
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f}  {task.fields[tok_s]:,.0f} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        ]
        with Progress(*columns, console=self.console, disable=not show_progress) as progress:
            task = progress.add_task("train", total=cfg.max_steps, completed=self.step, loss=float("nan"), tok_s=0.0)
            window_start, window_tokens = time.perf_counter(), 0
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                self.last_train_loss = self.train_step()
                self.elapsed_s += time.perf_counter() - t0
                window_tokens += cfg.tokens_per_step * self.shape.context_len
                tok_s = window_tokens / max(1e-9, time.perf_counter() - window_start)
                progress.update(task, completed=self.step, loss=self.last_train_loss, tok_s=tok_s)
                if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                    self._record_eval(tok_s)
                    window_start, window_tokens = time.perf_counter(), 0
                if self.checkpoint_dir is not None and (
                    self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps
                ):
                    self.save_checkpoint(self.checkpoint_dir / f"step-{self.step:06d}.pt")
        return self.history

    def _record_eval(self, tok_s: float) -> None:
        point = EvalPoint(self.step, self.last_train_loss, self.evaluate(), self.tokens_seen, self.elapsed_s)
        self.history.append(point)
        self.console.print(
            f"step {point.step}/{self.cfg.max_steps}  train {point.train_loss:.4f}  val {point.val_loss:.4f}  "
            f"ppl {point.val_ppl:.2f}  lr {self.scheduler.get_last_lr()[0]:.2e}  {tok_s:,.0f} tok/s  "
            f"epoch {self.sampler.epoch_progress:.2f}  {point.elapsed_s / 60:.1f} min",
            highlight=False,
        )

    def state_dict(self) -> dict:
        return {
            "version": CHECKPOINT_VERSION,
            "model_config": self.model_config,
            "shape": asdict(self.shape),
            "train_config": asdict(self.cfg),
            "data_fingerprint": self.split.fingerprint,
            "meta": self.meta,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "elapsed_s": self.elapsed_s,
            "history": [asdict(p) for p in self.history],
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": _rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        _set_rng_state(state["rng"])
        self.step, self.tokens_seen, self.elapsed_s = state["step"], state["tokens_seen"], state["elapsed_s"]
        self.history = [EvalPoint(**p) for p in state["history"]]
        if self.history:
            self.last_train_loss = self.history[-1].train_loss

    def save_checkpoint(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        torch.save(self.state_dict(), partial)
        partial.replace(path)  # a crash mid-write never leaves a truncated checkpoint under the real name
        old = sorted(path.parent.glob("step-*.pt"))[: -self.keep_checkpoints]
        for stale in old:
            stale.unlink()
