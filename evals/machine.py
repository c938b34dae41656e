"""The machine a measurement ran on, recorded beside every number that people compare (benchmarks,
perplexity sweeps): CPU and its vector features, the instruction set llmquant's kernels ran, torch,
threads, date, git commit and the command line."""
from __future__ import annotations

import datetime
import os
import subprocess
import sys

from llmquant.kernels.cpuinfo import FLAGS, cpu_flags, cpu_name  # noqa: F401  (re-exported)

#: set by bench/machine.py when it runs a script as another instruction set
SIMULATED_ENV = "LLMQUANT_BENCH_SIMULATED_ISA"


def machine_info() -> dict:
    import torch

    from llmquant.kernels import cpu_native

    native, why = cpu_native.load()
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=here, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here, timeout=10).stdout.strip()
        if commit and dirty:
            commit += "+uncommitted changes"
    except (OSError, subprocess.SubprocessError):
        commit = ""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    prog = f"-m {spec.name}" if spec is not None and spec.name not in (None, "__main__") else sys.argv[0]
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "kernels_isa": native.isa if native else f"unavailable: {why}",
        "detected_isa": native.detected_isa if native else None,
        "simulated_isa": os.environ.get(SIMULATED_ENV),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "command": " ".join(["python", prog, *sys.argv[1:]]),
        # llmquant's own switches in effect (e.g. LLMQUANT_CPU_FP32_GEMV=fma picks another decode kernel)
        # (LLMQUANT_CPU_ISA is implied by a simulated --isa)
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("LLMQUANT_") and k != SIMULATED_ENV
                and not (k == "LLMQUANT_CPU_ISA" and os.environ.get(SIMULATED_ENV))},
        "loadavg_at_start": os.getloadavg(),
    }


def header(info: dict) -> str:
    sim = f" (simulated: --isa {info['simulated_isa']}, every library capped)" if info["simulated_isa"] else ""
    env = "".join(f" {k}={v}" for k, v in info.get("env", {}).items())
    return (f"# {'env' + env + ' ' if env else ''}{info['command']}  ({info['date']}, commit {info['commit']})\n"
            f"# {info['cpu']}, {info['cores']} cores, flags {' '.join(info['cpu_flags'])}; llmquant kernels run "
            f"{info['kernels_isa']}{sim}; torch {info['torch']}, {info['threads']} threads, "
            f"load average {info['loadavg_at_start'][0]:.2f}")
