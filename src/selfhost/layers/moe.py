"""Sparse mixture-of-experts MLP (Mixtral, Qwen MoE, DeepSeek V2/V3): each token runs its top-k experts.

A router scores every expert per token (layers/router.py: softmax top-k, or DeepSeek's
group-limited methods, in fp32 as the references do), keeps the top k, and optionally
renormalises and scales their weights. Tokens are then grouped by expert:
one sort of the (token, expert) pairs, and each expert that has tokens in this step runs once on
all of them with the ordinary Linear kernels (so bf16 weights, int8/int4 and the CPU kernels apply
to experts as to any MLP); one gather returns the outputs to token order, weighted and summed. Experts nobody chose
this step cost nothing, which is what makes a sparse model cheap to decode. Qwen2-MoE adds a
shared expert that every token runs, scaled by its own sigmoid gate; DeepSeek's shared experts
(one MLP as wide as all of them) are added ungated.

On CPU, where every expert's products are of one kind selfhost's C kernels cover (bf16 weights
in the AMX tile layout, fp32 weights on the AVX-512 product, or int8 weights on Int8Linear's
"avx2" kernel) and the experts are plain SwiGLU without biases, the routed part runs in one C
call (`_moe_cpu.c`: softmax top-k routing, the grouping, every chosen expert's gate_up/SwiGLU/down
over its rows and the weighted sum) with the same arithmetic in the same order, so its expert
outputs equal the loop's below bit for bit; only the Python between them goes (~0.1 ms a layer
for a decode step, ~2.5 ms for a 32-request one on a 2-core VM). int8 experts' products are the
call's own (quantized activations, as Int8Linear's kernel), all chosen experts' chunks in one
trip to the thread pool per product; an expert with many rows (a prompt's) leaves those dots: on AMX
(from 32 rows) its integers widened exactly to bf16 (activations rounded to bf16 there, nearer exact
int8 than the loop, not its bits), on AVX-512 VNNI without AMX (from 2 rows) a register-blocked
kernel on the loop's own int8 blocks (its sums in another order). SELFHOST_MOE=python keeps the loop
(to compare).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from selfhost.layers import activation, linear
from selfhost.layers.bf16_linear import Bf16Linear
from selfhost.layers.linear import Linear
from selfhost.layers.mlp import GatedMLP
from selfhost.layers.router import route

try:
    from selfhost.layers import _moe_cpu
except ImportError:  # not compiled
    _moe_cpu = None

USE_EXPERT_KERNEL = _moe_cpu is not None and os.environ.get("SELFHOST_MOE", "c") != "python"

# The C call's product kinds (its enum) for the experts' modules.
EXPERT_KINDS = {"bf16_tiles": 0, "fp32": 1, "int8": 2}


def _expert_product_kind(module) -> tuple[str, int] | None:
    """(kind, few-row switch) of the kernels `module.forward` calls, or None where the C call lacks them."""
    if getattr(module, "bias", None) is not None:
        return None
    if type(module) is Bf16Linear and module.layout == "tiles" and module.in_features % 32 == 0:
        return "bf16_tiles", module.few_rows_max
    if type(module) is Linear and linear.USE_GEMM and module.weight.is_contiguous():
        return "fp32", 0
    if _int8_rows(module) is not None and module.in_features % 32 == 0:
        return "int8", 0
    return None


def _int8_rows(module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(int8 weight rows, fp32 scale per row) of a product run by quant/_int8_cpu.c's arithmetic (Int8Linear
    prepared for its "avx2" kernel), which the C call repeats; None for any other module. Read from the
    module's buffers: models and layers never import quant (gpt-fast's drop-in quantized modules)."""
    qweight, scales = module._buffers.get("qweight"), module._buffers.get("scales")
    if (getattr(module, "kernel", None) != "avx2" or qweight is None or qweight.dtype != torch.int8
            or qweight.shape != (module.out_features, module.in_features) or not qweight.is_contiguous()
            or scales is None or scales.dtype != torch.float32 or scales.shape != (module.out_features,)
            or not scales.is_contiguous()):
        return None
    return qweight, scales


def _expert_tensors(module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, per-row scales or None) as the C call reads a product's weights."""
    return _int8_rows(module) or (module.weight, None)


def _expert_fields(expert: GatedMLP) -> tuple[torch.Tensor | None, ...]:
    """One expert's row of the C call's table (_moe_cpu.c's EXPERT_FIELDS): gate_up and down weights, then
    their per-row scales (int8; None, an address of 0, otherwise)."""
    gate_up, gate_up_scales = _expert_tensors(expert.gate_up_proj)
    down, down_scales = _expert_tensors(expert.down_proj)
    return gate_up, down, gate_up_scales, down_scales


def _address(module: nn.Module) -> tuple[int, int]:
    """Which module holds the product and where its weight lies: modules are replaced (bf16 conversion,
    quantization) and weights moved (the weight arena) after a layer is built."""
    weight = module._parameters.get("weight")
    if weight is None:
        weight = module._buffers.get("qweight")
    return id(module), 0 if weight is None else weight.data_ptr()


class ExpertKernel:
    """The routed experts of one SparseMoE as a table of weight addresses for `_moe_cpu.run`."""

    def __init__(self, experts: nn.ModuleList, kind: str, few_rows_max: int):
        self.kind, self.few_rows_max = EXPERT_KINDS[kind], few_rows_max
        self.intermediate = experts[0].down_proj.in_features
        tensors = [t for e in experts for t in _expert_fields(e)]
        assert len(tensors) == len(experts) * _moe_cpu.expert_fields()
        self.table = torch.tensor([0 if t is None else t.data_ptr() for t in tensors], dtype=torch.int64)
        self._keep = tensors  # the table holds addresses: keep the tensors alive while it is used

    @classmethod
    def for_experts(cls, experts: nn.ModuleList, act: str, swiglu_limit: float | None) -> ExpertKernel | None:
        if not USE_EXPERT_KERNEL or act != "silu" or swiglu_limit is not None:
            return None
        kinds = {_expert_product_kind(m) for e in experts for m in (e.gate_up_proj, e.down_proj)}
        if len(kinds) != 1 or None in kinds:  # one kind, one switch: the C call makes one choice
            return None
        kind, few_rows_max = kinds.pop()
        if kind != "int8" and not activation.SILU_MUL_KERNEL:  # int8 experts carry their own SwiGLU
            return None
        if not _moe_cpu.available(EXPERT_KINDS[kind]) or experts[0].down_proj.in_features % 32:
            return None
        return cls(experts, kind, few_rows_max)


def expert_module_ids(model: nn.Module) -> set[int]:
    """ids of every module inside a mixture's experts: they keep the products their one C call runs
    (models/fp32_products.py, quant/apply.py), so the Python expert loop it is checked against matches it."""
    return {id(m) for moe in model.modules() if type(moe) is SparseMoE for m in moe.experts.modules()}


class SparseMoE(nn.Module):
    def __init__(self, hidden_size: int, expert_size: int, num_experts: int, top_k: int, normalize_top_k: bool,
                 activation: str, shared_expert_size: int = 0, shared_expert_gated: bool = True,
                 routing: str = "softmax_top_k", num_groups: int = 1, top_k_groups: int = 1,
                 routed_scaling_factor: float = 1.0, router_bias: bool = False, expert_bias: bool = False,
                 swiglu_alpha: float | None = None, swiglu_limit: float | None = None):
        """routing: a key of layers.router.ROUTING; "noaux_tc" adds the router's score-correction bias.
        gpt-oss: a router with a bias, experts with biases and the clamped SwiGLU (alpha, limit)."""
        super().__init__()
        self.num_experts, self.top_k, self.normalize_top_k = num_experts, top_k, normalize_top_k
        self.routing, self.num_groups, self.top_k_groups = routing, num_groups, top_k_groups
        self.routed_scaling_factor = routed_scaling_factor
        self.gate = Linear(hidden_size, num_experts, bias=router_bias)  # the router
        # DeepSeek V3's per-expert bias on the scores that choose experts (checkpoint: gate.e_score_correction_bias)
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts) if routing == "noaux_tc" else None)
        self.experts = nn.ModuleList(GatedMLP(hidden_size, expert_size, activation, expert_bias, swiglu_alpha,
                                              swiglu_limit) for _ in range(num_experts))
        self.activation, self.swiglu_limit = activation, swiglu_limit
        self._expert_kernel: ExpertKernel | None = None
        self._expert_kernel_key = None  # the weights' addresses it was decided for
        self.shared_expert = GatedMLP(hidden_size, shared_expert_size, activation, bias=False) \
            if shared_expert_size else None
        self.shared_expert_gate = Linear(hidden_size, 1, bias=False) if shared_expert_size and shared_expert_gated \
            else None

    def expert_kernel(self) -> ExpertKernel | None:
        """The C call for this layer's experts, decided again whenever their weights have moved."""
        experts = self.experts
        key = (_address(experts[0].gate_up_proj), _address(experts[-1].down_proj))
        if key != self._expert_kernel_key:
            self._expert_kernel = ExpertKernel.for_experts(experts, self.activation, self.swiglu_limit)
            self._expert_kernel_key = key
        return self._expert_kernel

    def forward(self, x: torch.Tensor, num_threads: int = 1) -> torch.Tensor:
        """(T, hidden) -> (T, hidden)."""
        logits = self.gate.forward(x, num_threads).float()  # (T, num_experts)
        kernel = self.expert_kernel() if USE_EXPERT_KERNEL else None
        if (kernel is not None and x.dtype == torch.float32 and x.device.type == "cpu"
                and not torch.is_grad_enabled()):
            out = self._routed_in_c(kernel, x.contiguous(), logits.contiguous(), num_threads)
        else:
            out = self._routed(x, logits, num_threads)
        if self.shared_expert is not None:
            shared = self.shared_expert.forward(x, num_threads)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate.forward(x, num_threads)) * shared
            out = out + shared
        return out

    def _routed_in_c(self, kernel: ExpertKernel, x: torch.Tensor, logits: torch.Tensor, num_threads: int):
        tokens, hidden = x.shape
        out = torch.empty(tokens, hidden)
        if self.routing == "softmax_top_k":  # routed inside the call
            experts = torch.empty(tokens, self.top_k, dtype=torch.int64)
            weights = torch.empty(tokens, self.top_k)
            routed_logits = logits.data_ptr()
        else:
            weights, experts = route(logits, self.routing, self.top_k, self.normalize_top_k, self.num_groups,
                                     self.top_k_groups, self.routed_scaling_factor, self.e_score_correction_bias)
            weights, experts = weights.float().contiguous(), experts.contiguous()
            routed_logits = 0
        _moe_cpu.run(kernel.table.data_ptr(), kernel.kind, kernel.few_rows_max, x.data_ptr(), routed_logits,
                     experts.data_ptr(), weights.data_ptr(), out.data_ptr(), tokens, hidden, kernel.intermediate,
                     self.num_experts, self.top_k, self.normalize_top_k, self.routed_scaling_factor, num_threads)
        return out

    def _routed(self, x: torch.Tensor, logits: torch.Tensor, num_threads: int) -> torch.Tensor:
        """The routed experts' weighted sum, expert by expert through the modules (any kind of weights)."""
        weights, experts = route(
            logits, self.routing, self.top_k, self.normalize_top_k,
            self.num_groups, self.top_k_groups, self.routed_scaling_factor, self.e_score_correction_bias,
        )  # (T, k) each
        weights = weights.to(x.dtype)
        # Group the T * k (token, expert) pairs by expert with one sort; each chosen expert runs once on
        # its rows, writing a contiguous slice of `results`; one gather puts the pairs back in token
        # order (cheaper than a scatter-add per expert: index_add_ of one row costs ~80 us on CPU).
        flat = experts.flatten()
        order = flat.argsort(stable=True)
        tokens = order // self.top_k
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        results = torch.empty(flat.numel(), x.shape[1], dtype=x.dtype, device=x.device)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                results[start:start + count] = self.experts[expert].forward(x[tokens[start:start + count]], num_threads)
                start += count
        pairs = results[order.argsort()].view(x.shape[0], self.top_k, x.shape[1])
        return (pairs * weights.unsqueeze(-1)).sum(dim=1)
