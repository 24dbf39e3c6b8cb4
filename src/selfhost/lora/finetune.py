"""`selfhost finetune`: train LoRA adapters on a frozen base with selfhost's own CausalLM.

The model trained is the one the engine serves (models/loader.py), with
LoRALinear wrapped around the target projections; only A and B receive
gradients. The loop reuses train/: TrainConfig, the warm-up + cosine schedule
(`lr_factor`), clipping and accumulation; examples of different lengths are
right-padded per micro-batch (causal attention never looks at the padding) and
the loss is the mean over the tokens their loss mask selects.

Checkpoints hold what the next step depends on (A and B, AdamW moments, the
schedule's step, the data order and RNG states), so a resumed run ends with the
same adapter as one that never stopped (same device, torch build and threads).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from selfhost.errors import SelfhostError
from selfhost.lora.adapter_format import Adapter, LoraConfig, write_adapter
from selfhost.lora.apply import add_trainable_adapter, extract_adapter
from selfhost.lora.data import Example
from selfhost.models.decoder import CausalLM
from selfhost.train.attention import BatchCausalAttention
from selfhost.train.config import TrainConfig
from selfhost.train.export import staged_folder
from selfhost.train.trainer import lr_factor

CHECKPOINT_VERSION = 1
REPORT_FILE = "finetune_report.json"


class ResumeError(SelfhostError):
    """A fine-tuning checkpoint that cannot continue this run (unreadable, or other settings or data)."""


def data_fingerprint(examples: list[Example]) -> str:
    """Identifies the exact examples and masks, so a resumed run can refuse different data."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(repr((e.token_ids, e.loss_mask)).encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class FinetuneResult:
    steps: int
    train_loss: float
    base_eval_loss: float | None  # the frozen base on the eval examples (the adapter starts at B = 0)
    eval_loss: float | None
    trainable_params: int
    base_params: int
    elapsed_s: float

    @property
    def eval_ppl(self) -> float | None:
        return None if self.eval_loss is None else math.exp(self.eval_loss)

    @property
    def base_eval_ppl(self) -> float | None:
        return None if self.base_eval_loss is None else math.exp(self.base_eval_loss)


def collate(examples: list[Example], pad_id: int,
            device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T) inputs, (B, T) targets and (B, T) loss weights of right-padded examples, on `device`."""
    length = max(len(e.token_ids) for e in examples) - 1
    inputs = torch.full((len(examples), length), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), length), pad_id, dtype=torch.long)
    weights = torch.zeros(len(examples), length)
    for row, e in enumerate(examples):
        n = len(e.token_ids) - 1
        inputs[row, :n] = torch.tensor(e.token_ids[:-1])
        targets[row, :n] = torch.tensor(e.token_ids[1:])
        weights[row, :n] = torch.tensor(e.loss_mask[1:], dtype=torch.float32)
    return inputs.to(device), targets.to(device), weights.to(device)


def masked_loss(model: CausalLM, inputs: torch.Tensor, targets: torch.Tensor,
                weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over the weighted tokens, and how many there are."""
    B, T = inputs.shape
    positions = torch.arange(T, device=inputs.device).repeat(B)  # (B*T,)
    hidden = model(inputs.reshape(-1), positions, BatchCausalAttention(B, T))  # (B*T, hidden)
    losses = F.cross_entropy(model.compute_logits(hidden), targets.reshape(-1), reduction="none")  # (B*T,)
    w = weights.reshape(-1)
    return (losses * w).sum(), w.sum()


@torch.no_grad()
def evaluate(model: CausalLM, examples: list[Example], batch_size: int, pad_id: int) -> float:
    """Mean loss (nats) over the loss tokens of `examples`."""
    total, count = 0.0, 0.0
    for i in range(0, len(examples), batch_size):
        loss, n = masked_loss(model, *collate(examples[i:i + batch_size], pad_id, model.model.norm.weight.device))
        total, count = total + loss.item(), count + n.item()
    return total / count


def load_base(model_dir: Path, device: torch.device, max_len: int, quantization: str | None) -> CausalLM:
    """The frozen base in fp32, or QLoRA-style quantized with a kernel gradients flow through."""
    from selfhost.models.loader import load_model

    model = load_model(model_dir, torch.float32, device, max_len=max_len)
    if quantization is not None:
        from selfhost.quant.apply import quantize_model
        from selfhost.quant.config import QuantConfig

        quantize_model(model, QuantConfig(method=quantization), kernel="dequant")
    return model


class Finetuner:
    """Adapters on `model` (frozen), trained on `train` for cfg.max_steps optimizer steps."""

    def __init__(self, model: CausalLM, lora: LoraConfig, cfg: TrainConfig, train: list[Example],
                 pad_id: int, console: Console | None = None, checkpoint_dir: Path | None = None):
        self.model, self.lora, self.cfg, self.train, self.pad_id = model, lora, cfg, train, pad_id
        self.console = console or Console(stderr=True)
        self.checkpoint_dir = checkpoint_dir  # None: no checkpoints
        torch.manual_seed(cfg.seed)
        self.rng = random.Random(cfg.seed)
        _check_trainable(model)
        self.base_params = sum(p.numel() for p in model.parameters())
        model.requires_grad_(False)
        self.params = add_trainable_adapter(model, lora, cfg.seed)
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                           weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.order: list[int] = []
        self.step = 0
        self.base_eval_loss: float | None = None

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.params)

    def _next_examples(self) -> list[Example]:
        batch = []
        while len(batch) < self.cfg.batch_size:
            if not self.order:  # a new epoch, in a fresh order
                self.order = list(range(len(self.train)))
                self.rng.shuffle(self.order)
            batch.append(self.train[self.order.pop()])
        return batch

    def train_step(self) -> float:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(self.cfg.grad_accum):
            batch = collate(self._next_examples(), self.pad_id, self.model.model.norm.weight.device)
            loss, count = masked_loss(self.model, *batch)
            loss = loss / count.clamp(min=1) / self.cfg.grad_accum
            loss.backward()
            total += loss.item()
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return total

    def run(self, eval_examples: list[Example] | None = None, show_progress: bool = True) -> FinetuneResult:
        evaluate_now = (lambda: evaluate(self.model.eval(), eval_examples, self.cfg.batch_size, self.pad_id)) \
            if eval_examples else (lambda: None)
        if self.step == 0:
            self.base_eval_loss = evaluate_now()  # B = 0: still the base model
        base_eval = self.base_eval_loss
        if base_eval is not None:
            self.console.print(f"base model: eval loss {base_eval:.4f}  ppl {math.exp(base_eval):.2f}", highlight=False)
        columns = [TextColumn("[bold]finetune"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn()]
        start, loss, eval_loss = time.perf_counter(), float("nan"), base_eval
        with Progress(*columns, console=self.console, disable=not show_progress) as progress:
            task = progress.add_task("finetune", total=self.cfg.max_steps, loss=loss)
            while self.step < self.cfg.max_steps:
                loss = self.train_step()
                progress.update(task, completed=self.step, loss=loss)
                if eval_examples and (self.step % self.cfg.eval_every == 0 or self.step == self.cfg.max_steps):
                    eval_loss = evaluate_now()
                    self.console.print(f"step {self.step}/{self.cfg.max_steps}  train {loss:.4f}  "
                                       f"eval {eval_loss:.4f}  ppl {math.exp(eval_loss):.2f}", highlight=False)
                if self.checkpoint_dir is not None and (
                        self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.max_steps):
                    self.save_checkpoint(self.checkpoint_dir / f"step-{self.step:06d}.pt")
        self.model.eval()
        return FinetuneResult(self.step, loss, base_eval, eval_loss if eval_examples else None,
                              self.trainable_params, self.base_params, time.perf_counter() - start)

    def state_dict(self) -> dict:
        # Plain types and tensors only, so checkpoints load with torch.load(weights_only=True).
        return {
            "version": CHECKPOINT_VERSION,
            "lora": self.lora.to_json(),
            "train_config": asdict(self.cfg),
            "data_fingerprint": data_fingerprint(self.train),
            "step": self.step,
            "base_eval_loss": self.base_eval_loss,
            "params": [p.detach().clone() for p in self.params],
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "order": list(self.order),
            "python_rng": self.rng.getstate(),
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict, source: str) -> None:
        """Continue from `state`; refuse one written with other settings or data."""
        mine = self.state_dict()
        for key, what in (("lora", "adapter settings"), ("train_config", "training settings"),
                          ("data_fingerprint", "training data")):
            if state.get(key) != mine[key]:
                raise ResumeError(f"checkpoint {source} was written with other {what}; resume with the same ones")
        with torch.no_grad():
            for p, saved in zip(self.params, state["params"], strict=True):
                p.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.order = list(state["order"])
        self.rng.setstate(_as_tuples(state["python_rng"]))
        torch.set_rng_state(state["torch_rng"])
        self.step, self.base_eval_loss = state["step"], state["base_eval_loss"]

    def save_checkpoint(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        torch.save(self.state_dict(), partial)
        partial.replace(path)  # a crash mid-write never leaves a truncated checkpoint under the real name
        for stale in sorted(path.parent.glob("step-*.pt"))[:-2]:
            stale.unlink()

    def resume(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as err:
            raise ResumeError(f"checkpoint {path} cannot be read: {err}") from err
        if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
            raise ResumeError(f"{path} is not a fine-tuning checkpoint of this selfhost version")
        self.load_state_dict(state, str(path))

    def adapter(self) -> Adapter:
        return extract_adapter(self.model, self.lora)

    def save(self, out: Path, overwrite: bool = False, result: FinetuneResult | None = None) -> None:
        """Write the adapter in PEFT's format, all or nothing; with `result`, also REPORT_FILE
        (the run against the base model; PEFT and vLLM ignore it)."""
        with staged_folder(out, overwrite) as staging:
            write_adapter(staging, self.adapter())
            if result is not None:
                report = {**asdict(result), "eval_ppl": result.eval_ppl, "base_eval_ppl": result.base_eval_ppl,
                          "train_config": asdict(self.cfg), "train_examples": len(self.train)}
                (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")


def _check_trainable(model: CausalLM) -> None:
    """Gradients must flow through the frozen base to the adapters of earlier layers: the int8
    and int4 "dequant" kernels (F.linear) allow that; torch's packed int4 CPU kernel has no backward."""
    from selfhost.quant.int4 import Int4Linear

    if model.spec.attn_softcap is not None:
        raise SelfhostError("fine-tuning a model with attention soft-capping (Gemma 2) is not supported yet")

    if any(isinstance(m, Int4Linear) and m.kernel == "int4pack_cpu" for m in model.modules()):
        raise SelfhostError("this int4 base runs torch's packed CPU kernel, which has no backward; quantize "
                            "with kernel='dequant' to fine-tune over it (selfhost finetune --quantization int4)")


def _as_tuples(value):
    # random.setstate needs tuples where a checkpoint round trip may give lists.
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
