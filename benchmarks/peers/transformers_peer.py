"""transformers as a peer: `generate` (or `generate_batch`) with its defaults, in a process of its own.

It never imports selfhost, whose import sets OpenMP variables for the whole
process: measured in selfhost's process, transformers ran about 2x slower than
in its own. The only setting it gets is the thread count every system gets.

settings: {"batching": "sequential" | "static" | "continuous"}
  sequential  one `generate` call per prompt (a single prompt: plain generate)
  static      one left-padded batch through `generate`
  continuous  transformers' own continuous batching, `generate_batch`
"""

from __future__ import annotations

import os
import sys
from typing import Any


def launch() -> tuple[str, dict[str, str], list[str]]:
    """(Python, environment additions, notes): the benchmark's own Python, nothing added."""
    return sys.executable, {}, []


class TransformersEngine:
    def __init__(self, model_dir: str, threads: int, batching: str):
        import torch
        import transformers

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.batching = batching
        self.info = {"transformers": transformers.__version__, "torch": torch.__version__, "batching": batching,
                     "dtype": str(self.model.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
                     "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "KMP_", "GOMP_"))}}

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        with self.torch.inference_mode():
            if self.batching == "continuous":
                return self._continuous(prompts, max_tokens)
            if self.batching == "static":
                return self._static(prompts, max_tokens)
            return [self._static([p], max_tokens)[0] for p in prompts]

    def _static(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        ids = self.torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
        mask = self.torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = self.model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                  do_sample=False, pad_token_id=0)
        return out[:, width:].tolist()

    def _continuous(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        from transformers import GenerationConfig

        config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        outputs = self.model.generate_batch(prompts, generation_config=config)  # in input order
        return [list(o.generated_tokens) for o in outputs.values()]


def load(job: dict[str, Any]) -> TransformersEngine:
    return TransformersEngine(job["model_dir"], job["threads"], job["settings"].get("batching", "sequential"))


if __name__ == "__main__":
    import job as peer_job  # the sibling module: this file runs as a script

    peer_job.run_peer(load)
