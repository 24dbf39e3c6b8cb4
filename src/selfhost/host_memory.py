"""This machine's RAM: how much there is, and how much a new allocation can still get.

Free memory is Linux's MemAvailable (free pages plus the page cache and slabs the
kernel can reclaim), not MemFree, which leaves out the page cache and so reads
near zero on any machine that has been up a while. Stdlib only.
"""

from __future__ import annotations

import os
from pathlib import Path

_MEMINFO = Path("/proc/meminfo")


def _meminfo_bytes(field: str) -> int | None:
    """One field of /proc/meminfo in bytes; None where the file or field is missing."""
    try:
        text = _MEMINFO.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == field:
            return int(value.split()[0]) * 1024  # the kernel reports kB
    return None


def available_memory_bytes() -> int:
    """RAM a process can allocate now without swapping (MemAvailable)."""
    available = _meminfo_bytes("MemAvailable")
    if available is not None:
        return available
    # No /proc (macOS): free pages, the closest the OS reports.
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def total_memory_bytes() -> int:
    """Physical RAM of this machine."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
