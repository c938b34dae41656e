"""The vLLM tier's environment switch: ``LLMQUANT_TEST_VLLM_CPU=avx2`` runs the whole tier as an
AVX2-only machine would (vLLM's AVX2 library, our kernels capped at AVX2) on any x86 machine.

    LLMQUANT_TEST_VLLM_CPU=avx2 /opt/llmquant-vllm-venv/bin/python -m pytest -m vllm tests/vllm
"""
from __future__ import annotations

import getpass
import os
import runpy
import tempfile
from pathlib import Path

SIM = os.environ.get("LLMQUANT_TEST_VLLM_CPU")
if SIM not in (None, "", "avx2"):
    raise RuntimeError(f"LLMQUANT_TEST_VLLM_CPU={SIM!r}: the only simulated CPU is 'avx2'")
if SIM == "avx2":
    sim_dir = str(Path(__file__).with_name("cpu_sim"))
    # every child (vLLM engines, servers, probes) imports the sitecustomize there at start-up ...
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (sim_dir, os.environ.get("PYTHONPATH")) if p)
    # ... and this process gets the same answers before any test module imports vLLM
    runpy.run_path(str(Path(sim_dir) / "sitecustomize.py"))
    os.environ.setdefault("LLMQUANT_CPU_ISA", "avx2")  # our own kernels as on that machine
    # ... and its own compile cache, as another machine would have: torch's inductor, asked for the CPU's
    # vector width through the patched answers, otherwise reuses kernels it compiled for the real
    # AVX-512 CPU. (Seen: vLLM's compiled vocab-parallel embedding mask then returned garbage indices
    # under tensor parallelism, "index out of range in self", on the second CI pass only.)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                          os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_sim_avx2"))
