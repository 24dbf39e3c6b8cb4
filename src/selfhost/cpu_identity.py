"""What CPU this is: its model name and the ISA flags that decide which kernels it can run.

Read from /proc/cpuinfo (x86 "flags", Arm "Features"). Used to key measurements cached
per CPU (models/weight_precision.py) and to head benchmark tables (bench/machine_limits.py).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

# SELFHOST_NO_AMX=1 keeps selfhost's kernels (../_amx_tiles.h reads the same variable) and torch's oneDNN
# (capped through ONEDNN_MAX_CPU_ISA: selfhost/__init__.py) off Intel AMX: to see what this machine does
# without it (a stand-in for a CPU with AVX-512, VNNI and BF16 but no tiles), or where a hypervisor
# does not keep the tile state. The CPU then reports no amx_* flags here, so choices measured and
# cached per CPU are measured again for it.
NO_AMX_VARIABLE = "SELFHOST_NO_AMX"
AMX_FLAGS = ("amx_bf16", "amx_int8")
# oneDNN's cap without AMX: AVX-512 with VNNI and BF16, the most a CPU without tiles offers.
ONEDNN_ISA_WITHOUT_AMX = "AVX512_CORE_BF16"


def amx_disabled() -> bool:
    return os.environ.get(NO_AMX_VARIABLE, "") not in ("", "0")

# The flags that decide which kernels a CPU inference engine can use, in the order
# printed: x86 vector and matrix extensions, then Arm's (/proc/cpuinfo "Features").
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8",
             "asimd", "asimddp", "i8mm", "bf16", "sve", "sve2", "sme")


@dataclass(frozen=True)
class CpuIdentity:
    model: str
    isa_flags: tuple[str, ...]  # those of ISA_FLAGS the CPU reports, in ISA_FLAGS order


def parse_cpuinfo(text: str) -> CpuIdentity:
    """The CPU model and ISA flags of interest from /proc/cpuinfo text (x86 or Arm)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip().lower()
        if sep and key not in fields:  # the first processor's entry describes them all here
            fields[key] = value.strip()
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    # x86 names the model; Arm kernels often give only implementer and part numbers.
    model = fields.get("model name") or fields.get("hardware") or fields.get("cpu model") or fields.get("processor")
    if not model or model.isdigit():
        implementer, part = fields.get("cpu implementer"), fields.get("cpu part")
        model = f"CPU implementer {implementer}, part {part}" if implementer else platform.processor() or "unknown"
    return CpuIdentity(model=model, isa_flags=tuple(f for f in ISA_FLAGS if f in flags))


def read_cpu_identity(path: Path = Path("/proc/cpuinfo")) -> CpuIdentity:
    """This CPU; its amx flags dropped under SELFHOST_NO_AMX."""
    try:
        identity = parse_cpuinfo(path.read_text())
    except OSError:  # not Linux: the model only, no flags
        return CpuIdentity(model=platform.processor() or platform.machine() or "unknown", isa_flags=())
    if amx_disabled():
        return CpuIdentity(identity.model, tuple(f for f in identity.isa_flags if f not in AMX_FLAGS))
    return identity
