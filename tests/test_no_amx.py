"""SELFHOST_NO_AMX: selfhost's kernels and torch's oneDNN keep off AMX, and the CPU's identity (the key of
choices measured per CPU) loses its amx flags. Each case runs in a fresh process: the variable is read
when the kernels load and when oneDNN first runs."""

import json
import os
import subprocess
import sys

import pytest

from selfhost.cpu_identity import read_cpu_identity

PROBE = """
import importlib, json, os
import selfhost
from selfhost.cpu_identity import read_cpu_identity

def tiles(module, check):  # False where the extension was not built (no compiler)
    try:
        return getattr(importlib.import_module(module), check)()
    except ImportError:
        return False

print(json.dumps({"flags": read_cpu_identity().isa_flags,
                  "prompt_tiles": tiles("selfhost.engine._prefill_attention_cpu", "tiles_available"),
                  "int8_tiles": tiles("selfhost.quant._int8_cpu", "amx_available"),
                  "bf16_tiles": tiles("selfhost.layers._bf16_tiles_cpu", "amx_available"),
                  "onednn_cap": os.environ.get("ONEDNN_MAX_CPU_ISA")}))
"""


def probe(value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("SELFHOST_NO_AMX", "ONEDNN_MAX_CPU_ISA")}
    if value is not None:
        env["SELFHOST_NO_AMX"] = value
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_no_amx_turns_every_tile_kernel_and_onednn_off():
    off = probe("1")
    assert not any(f.startswith("amx") for f in off["flags"])
    assert off["prompt_tiles"] is False and off["int8_tiles"] is False and off["bf16_tiles"] is False
    assert off["onednn_cap"] == "AVX512_CORE_BF16"


@pytest.mark.parametrize("value", [None, "", "0"])
def test_unset_empty_or_zero_leaves_the_cpu_as_it_is(value):
    on = probe(value)
    has_amx = "amx_bf16" in read_cpu_identity().isa_flags
    assert ("amx_bf16" in on["flags"]) == has_amx
    assert on["onednn_cap"] is None
    # Where the CPU has AMX (and Linux grants its state), the tile kernels take it.
    if has_amx:
        assert on["prompt_tiles"] and on["bf16_tiles"]
