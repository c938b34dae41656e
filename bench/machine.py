"""What machine a benchmark ran on, and running one as another instruction set would (shared by the bench
scripts; run them as ``python bench/NAME.py``).

``--isa avx2`` on an AVX-512 machine re-runs the script with the AVX-512 paths off everywhere: llmquant's
kernels (``LLMQUANT_CPU_ISA``), MKL (``MKL_ENABLE_INSTRUCTIONS``), oneDNN (``ONEDNN_MAX_CPU_ISA``) and
ATen's own vectorized code (``ATEN_CPU_CAPABILITY``), so that the baselines (``F.linear``, torch's int4
path) are those of an AVX2-only machine too. Every result records which instruction set ran.
"""
import datetime
import os
import platform
import subprocess
import sys

#: environment that caps every library at an instruction set
SIMULATE = {
    "avx2": {"LLMQUANT_CPU_ISA": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "ATEN_CPU_CAPABILITY": "avx2"},
}
_MARK = "LLMQUANT_BENCH_SIMULATED_ISA"


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
    """The vector features that matter here, as /proc/cpuinfo names them."""
    want = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in want if w in have]
    except OSError:
        pass
    return []


def simulate_isa(isa: str | None) -> None:
    """Re-execute this script with every library capped at ``isa`` (once; no-op for None)."""
    if not isa or os.environ.get(_MARK) == isa:
        return
    if isa not in SIMULATE:
        raise SystemExit(f"--isa {isa}: can simulate {sorted(SIMULATE)}")
    env = os.environ | SIMULATE[isa] | {_MARK: isa}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def machine_info() -> dict:
    """The machine, the instruction set llmquant's kernels run on, and how this result was made."""
    import torch

    from llmquant.kernels import cpu_native

    native, why = cpu_native.load()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "kernels_isa": native.isa if native else f"unavailable: {why}",
        "detected_isa": native.detected_isa if native else None,
        "simulated_isa": os.environ.get(_MARK),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "command": " ".join(["python", *sys.argv]),
        "loadavg_at_start": os.getloadavg(),
    }


def header(info: dict) -> str:
    sim = f" (simulated: --isa {info['simulated_isa']}, every library capped)" if info["simulated_isa"] else ""
    return (f"# {info['command']}  ({info['date']}, commit {info['commit']})\n"
            f"# {info['cpu']}, {info['cores']} cores, flags {' '.join(info['cpu_flags'])}; llmquant kernels run "
            f"{info['kernels_isa']}{sim}; torch {info['torch']}, load average {info['loadavg_at_start'][0]:.2f}")
