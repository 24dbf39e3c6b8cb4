"""KV caches on CPU: zero-filled tensors whose pages are mapped when first written, not at load."""

import pytest
import torch

from selfhost.engine.zeroed_memory import ALIGNMENT, zeros_on_demand


def resident_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_zeros_on_demand_are_zeros_of_the_shape_and_dtype_aligned(dtype):
    t = zeros_on_demand((3, 5, 7, 2), dtype, torch.device("cpu"))
    assert t.shape == (3, 5, 7, 2) and t.dtype == dtype and t.is_contiguous()
    assert torch.equal(t, torch.zeros(3, 5, 7, 2, dtype=dtype)) and t.data_ptr() % ALIGNMENT == 0
    t[1, 2] = 1  # writable, and writes land where torch indexes them
    assert t.sum().item() == 7 * 2 and t[1, 2].flatten().tolist() == [1] * 14


def test_a_large_cache_takes_memory_only_as_it_is_written():
    before = resident_bytes()
    t = zeros_on_demand((512, 1024, 1024), torch.uint8, torch.device("cpu"))  # 512 MiB
    untouched = resident_bytes()
    t[:64].fill_(1)  # 64 MiB written
    written = resident_bytes()
    assert untouched - before < 32 << 20
    assert written - untouched >= 60 << 20
    assert t[64:].max().item() == 0
