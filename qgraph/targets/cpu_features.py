"""Which integer dot-product instructions this x86 CPU has, read from /proc/cpuinfo (Linux) without extra packages.

onnxruntime's u8s8 GEMM on AVX2 without VNNI uses VPMADDUBSW, which sums two u8·s8 products into a saturating int16;
with 8-bit weights that sum can overflow (255·127·2 > 32767) and quietly clip. VNNI (AVX512-VNNI or AVX-VNNI)
accumulates in int32 and has no such problem.
"""

from __future__ import annotations

import functools
import logging
import platform
from pathlib import Path

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def has_vnni() -> bool:
    flags = cpu_flags()
    return bool({"avx512_vnni", "avx_vnni", "avx512vnni"} & flags)


def needs_reduce_range() -> bool:
    """True on x86 CPUs whose u8s8 kernels may saturate (no VNNI); False elsewhere (ARM has no such issue)."""
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64", "i386", "i686"):
        return False
    return not has_vnni()
