"""What CPU this is: its name and the vector features the kernels care about (from /proc/cpuinfo)."""
from __future__ import annotations

import platform

#: the vector features that matter here, as /proc/cpuinfo names them
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile",
         "asimd", "asimddp")  # the last two: AArch64 ("Features" there)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in FLAGS if w in have]
    except OSError:
        pass
    return []
