"""Running a benchmark as another instruction set would, and what machine it ran on (shared by the bench
scripts; run them as ``python bench/NAME.py``; the description itself is ``llmquant.evals.machine``).

``--isa avx2`` on an AVX-512 machine re-runs the script with the AVX-512 paths off everywhere: llmquant's
kernels (``LLMQUANT_CPU_ISA``), MKL (``MKL_ENABLE_INSTRUCTIONS``), oneDNN (``ONEDNN_MAX_CPU_ISA``) and
ATen's own vectorized code (``ATEN_CPU_CAPABILITY``), so that the baselines (``F.linear``, torch's int4
path) are those of an AVX2-only machine too. Every result records which instruction set ran.
"""
import os
import sys

from llmquant.evals.machine import SIMULATED_ENV, cpu_name, header, machine_info  # noqa: F401

#: environment that caps every library at an instruction set
SIMULATE = {
    "avx2": {"LLMQUANT_CPU_ISA": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "ATEN_CPU_CAPABILITY": "avx2"},
    # AVX2 with AVX-VNNI (Intel cores without AVX-512, e.g. Sierra Forest): needs a CPU that has AVX-VNNI
    "avx2_vnni": {"LLMQUANT_CPU_ISA": "avx2_vnni", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2_VNNI",
                  "ATEN_CPU_CAPABILITY": "avx2"},
}


def simulate_isa(isa: str | None) -> None:
    """Re-execute this script with every library capped at ``isa`` (once; no-op for None)."""
    if not isa or os.environ.get(SIMULATED_ENV) == isa:
        return
    if isa not in SIMULATE:
        raise SystemExit(f"--isa {isa}: can simulate {sorted(SIMULATE)}")
    env = os.environ | SIMULATE[isa] | {SIMULATED_ENV: isa}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)
