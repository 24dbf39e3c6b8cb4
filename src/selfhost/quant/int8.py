"""int8 weights: symmetric, one scale per output row; drop-in Linear and Embedding.

Kernels (chosen once, in `prepare`):
- "avx2": x86-64 CPUs with AVX2, when the optional C extension
  (`_int8_cpu.c`, compiled by `pip install`) is present. Activations are
  quantized to int8 in blocks of 32 values with a scale per block, products
  are summed exactly in int32, and the weight is read in its stored layout
  with software prefetching. A decode step streams the weights at close to
  memory bandwidth (benchmarks/quant_cpu.py); prompts run 1.3-3x faster than
  the fp32 path, slower than fbgemm's register-blocked GEMM.
- "fbgemm": other CPUs with PyTorch's fbgemm dynamic-quantized linear, which
  quantizes the activation matrix to 8 (7 without VNNI) bits on the fly and
  keeps its own packed copy of the weight.
- "dequant": anywhere else (CUDA, CPUs or builds without fbgemm): the int8
  weight is cast to the activation dtype inside the matmul and the per-row
  scale applied to the output; exact weight-only int8.
`aten._weight_int8pack_mm` was measured 5-40x slower than fbgemm here.
"""

from __future__ import annotations

import functools
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn


try:
    from selfhost.quant import _int8_cpu
except ImportError:  # not compiled (no C compiler at install, or a source tree without `pip install`)
    _int8_cpu = None

INT8_KERNELS = ("avx2", "fbgemm", "dequant")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> int8 (out, in) and fp32 scales (out,), weight ~= q * scale[:, None]."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return qweight.float() * scales.float()[:, None]


@functools.cache
def avx2_available() -> bool:
    """The compiled extension is importable and this CPU has AVX2 and FMA."""
    return _int8_cpu is not None and _int8_cpu.available()


@functools.cache
def fbgemm_available() -> bool:
    return (
        "fbgemm" in torch.backends.quantized.supported_engines
        and hasattr(torch.ops.quantized, "linear_dynamic")
        and hasattr(torch, "_make_per_channel_quantized_tensor")
    )


@functools.cache
def _cpu_has_vnni() -> bool:
    # Without VNNI, fbgemm's u8 x s8 pair sums can saturate int16: activations
    # are then quantized to 7 bits (reduce_range) to stay exact.
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def default_int8_kernel(device: torch.device) -> str:
    if device.type != "cpu":
        return "dequant"
    if avx2_available():
        return "avx2"
    return "fbgemm" if fbgemm_available() else "dequant"


def _avx2_linear(qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, widened_from_rows: int,
                 vnni_from_rows: int = sys.maxsize, amx_from_rows: int = sys.maxsize,
                 amx_packed: torch.Tensor | None = None):
    """y = x @ (q * scale)^T + b for fp32 x of any leading shape, through the C kernel: its int8 dots,
    from `vnni_from_rows` rows the same int8 blocks on its register-blocked VNNI kernel, from
    `amx_from_rows` rows its AMX-INT8 kernel with one scale per activation row (reading `amx_packed`,
    the weights' tiles packed at load, where given), or from `widened_from_rows` rows its product on
    the weights widened to bf16 (int8_products.py).

    The weights' addresses are taken once: a decode step makes over a hundred
    of these calls and attribute lookups would cost more than small products.
    The closure holds the tensors, so the addresses stay valid.
    """
    assert qweight.is_contiguous() and scales.dtype == torch.float32 and scales.is_contiguous()
    assert bias is None or (bias.dtype == torch.float32 and bias.is_contiguous())
    out_features, in_features = qweight.shape
    weight_ptr, scales_ptr, bias_ptr = qweight.data_ptr(), scales.data_ptr(), 0 if bias is None else bias.data_ptr()
    packed_ptr = 0 if amx_packed is None else amx_packed.data_ptr()

    def linear(x: torch.Tensor, num_threads: int, _keep=(qweight, scales, bias, amx_packed)) -> torch.Tensor:
        if not x.is_contiguous():
            x = x.contiguous()
        rows = x.numel() // in_features
        out = torch.empty(*x.shape[:-1], out_features)
        if widened_from_rows > rows >= amx_from_rows:
            _int8_cpu.linear_amx(x.data_ptr(), weight_ptr, scales_ptr, bias_ptr, out.data_ptr(), rows, out_features,
                                 in_features, num_threads, packed_ptr)
            return out
        product = (_int8_cpu.linear_widened if rows >= widened_from_rows
                   else _int8_cpu.linear_vnni if rows >= vnni_from_rows else _int8_cpu.linear)
        product(x.data_ptr(), weight_ptr, scales_ptr, bias_ptr, out.data_ptr(), rows, out_features, in_features,
                num_threads)
        return out

    return linear


def _fbgemm_pack(qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
    with warnings.catch_warnings():  # quantized tensors are deprecated in favour of torchao; still the fastest here
        warnings.simplefilter("ignore")
        zero_points = torch.zeros(qweight.shape[0], dtype=torch.long)
        qw = torch._make_per_channel_quantized_tensor(qweight.cpu(), scales.double().cpu(), zero_points, 0)
        return torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.float().cpu())


class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T + b, with q int8 (out, in) and one scale per output row."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self.kernel: str | None = None
        self._packed = None
        self._avx2 = None  # the avx2 kernel bound to this module's weights
        self._reduce_range = not _cpu_has_vnni()
        self._storage_bytes = 0
        # the "avx2" kernel's row switches as prepared (the decode-step runner calls the same products)
        self.widened_from_rows = self.vnni_from_rows = self.amx_from_rows = sys.maxsize
        # Where the AMX-INT8 kernel runs: the weights' tiles packed once (a second copy, qweight's size)
        self.amx_packed: torch.Tensor | None = None

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8Linear:
        q, scales = quantize_int8(linear.weight)
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device,
                     linear.weight.dtype)
        module.qweight, module.scales = q, scales.to(linear.weight.device)
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    def prepare(self, kernel: str | None = None, widened_from_rows: int = sys.maxsize,
                vnni_from_rows: int = sys.maxsize, amx_from_rows: int = sys.maxsize) -> None:
        """Turn the stored weights into the kernel's layout; once, after loading (again after the weights
        change). widened_from_rows: the "avx2" kernel's measured switch to widened weights; vnni_from_rows
        and amx_from_rows: its switches to the VNNI and AMX-INT8 kernels (int8_products.py; never by
        default). Where the AMX-INT8 kernel will run, its tiles are packed here, once: a copy as large as
        qweight, which a batched step then streams in order instead of repacking per call."""
        kernel = kernel or default_int8_kernel(self.qweight.device)
        assert kernel in INT8_KERNELS, kernel
        self._storage_bytes = sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.bias)
                                  if t is not None)
        if kernel == "avx2":
            assert avx2_available() and self.qweight.device.type == "cpu", "the avx2 kernel is not available here"
            self.qweight, self.scales = self.qweight.contiguous(), self.scales.float().contiguous()
            bias = None if self.bias is None else self.bias.float().contiguous()
            whole_blocks = self.in_features % 32 == 0  # both many-row products take whole blocks of 32 only
            self.widened_from_rows = widened_from_rows if whole_blocks else sys.maxsize
            self.vnni_from_rows = vnni_from_rows if whole_blocks else sys.maxsize
            self.amx_from_rows = amx_from_rows if whole_blocks else sys.maxsize
            self.amx_packed = None
            if self.amx_from_rows < self.widened_from_rows:
                self.amx_packed = torch.empty(_int8_cpu.amx_packed_bytes(self.out_features, self.in_features),
                                              dtype=torch.int8)
                _int8_cpu.pack_amx(self.qweight.data_ptr(), self.amx_packed.data_ptr(), self.out_features,
                                   self.in_features)
            self._avx2 = _avx2_linear(self.qweight, self.scales, bias, self.widened_from_rows, self.vnni_from_rows,
                                      self.amx_from_rows, self.amx_packed)
        if kernel == "fbgemm":
            self._packed = _fbgemm_pack(self.qweight, self.scales, self.bias)
            # The packed copy is all the kernel reads; do not keep the weight twice.
            # (An Int8Embedding sharing the tensor keeps its own reference.)
            self.qweight = None
        self.kernel = kernel

    @property
    def storage_bytes(self) -> int:
        """Bytes of the quantized format: int8 weight, scales, bias."""
        return self._storage_bytes

    def forward(self, x: torch.Tensor, num_threads: int = 1) -> torch.Tensor:
        """num_threads: threads the C kernel may use (the engine step's choice); torch's kernels take torch's."""
        if self._avx2 is not None and not x.requires_grad:
            if x.dtype == torch.float32:
                return self._avx2(x, num_threads)
            return self._avx2(x.float(), num_threads).to(x.dtype)
        if self._packed is not None:
            shape = x.shape
            out = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]).float(), self._packed, self._reduce_range)
            return out.view(*shape[:-1], self.out_features).to(x.dtype)
        out = F.linear(x, self.qweight.to(x.dtype)) * self.scales.to(x.dtype)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def swiglu(self, down: nn.Module, x: torch.Tensor, num_threads: int) -> torch.Tensor | None:
        """This gate|up layer's MLP in one call (GatedMLP), or None: see `swiglu_int8`."""
        return swiglu_int8(self, down, x, num_threads)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


def swiglu_int8(gate_up: nn.Module, down: nn.Module, x: torch.Tensor, num_threads: int) -> torch.Tensor | None:
    """down(silu(gate(x)) * up(x)) in one call where both layers are int8 on the "avx2" kernel and the
    separate calls would take the same products: past both layers' AMX switch (below their widened
    one), `_int8_cpu.swiglu_amx` (the activation applied to the gate|up sums as they leave the tiles,
    without writing the (rows, 2 x intermediate) product out and reading it back); past their widened
    switch, `_int8_cpu.swiglu_widened` (both weights widened, the MLP in one AMX call). The same bits
    as the three calls either way. None elsewhere."""
    if not (type(gate_up) is Int8Linear and type(down) is Int8Linear and gate_up._avx2 is not None
            and down._avx2 is not None and gate_up.bias is None and x.dtype == torch.float32
            and x.device.type == "cpu" and not torch.is_grad_enabled()):
        return None
    hidden, intermediate = gate_up.in_features, down.in_features
    rows = x.numel() // hidden
    if gate_up.out_features != 2 * intermediate or down.out_features != hidden or hidden % 32 or intermediate % 32:
        return None
    widened_from = max(gate_up.widened_from_rows, down.widened_from_rows)
    if (gate_up.amx_packed is not None and down.amx_packed is not None
            and max(gate_up.amx_from_rows, down.amx_from_rows) <= rows < widened_from):
        x = x.contiguous()
        out = torch.empty(*x.shape[:-1], hidden)
        _int8_cpu.swiglu_amx(x.data_ptr(), gate_up.amx_packed.data_ptr(), gate_up.scales.data_ptr(),
                             down.qweight.data_ptr(), down.amx_packed.data_ptr(), down.scales.data_ptr(),
                             0 if down.bias is None else down.bias.data_ptr(), out.data_ptr(), rows, intermediate,
                             hidden, num_threads)
        return out
    if rows < widened_from or not _int8_cpu.swiglu_available():
        return None
    x = x.contiguous()
    out = torch.empty(*x.shape[:-1], hidden)
    _int8_cpu.swiglu_widened(x.data_ptr(), gate_up.qweight.data_ptr(), gate_up.scales.data_ptr(),
                             down.qweight.data_ptr(), down.scales.data_ptr(),
                             0 if down.bias is None else down.bias.data_ptr(), out.data_ptr(), rows, intermediate,
                             hidden, num_threads)
    return out


class Int8Embedding(nn.Module):
    """Token embeddings stored int8 per row; looked-up rows are dequantized."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, dtype=torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("qweight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(num_embeddings, dtype=torch.float32, device=device))
        self.out_dtype = dtype

    @classmethod
    def from_float(cls, embedding: nn.Embedding) -> Int8Embedding:
        module = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.weight.device, embedding.weight.dtype)
        module.qweight, module.scales = quantize_int8(embedding.weight)
        return module

    def prepare(self, kernel: str | None = None) -> None:
        pass

    @property
    def storage_bytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * self.scales.element_size()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.qweight[ids].to(self.out_dtype)  # (T, hidden)
        return rows * self.scales[ids].to(self.out_dtype).unsqueeze(-1)
