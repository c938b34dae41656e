"""Helpers of the vLLM end-to-end tests: the float twin of a quantized model, greedy runs of
checkpoints in a child vLLM process (``vllm_greedy.py``), and probes for vLLM's own native ops."""
from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmquant import QuantConfig
from llmquant.formats.packing import dequantize_packed
from llmquant.formats.rotation import unpack_signs, unrotate
from llmquant.modules.quant_linear import QuantLinear
from llmquant.modules.walk import set_submodule
from llmquant.quantizers.plan import untie_if_quantizing_head

#: the engine in the child's own process (no EngineCore process), 1 GiB of KV cache, and vLLM's
#: inter-process traffic (tensor-parallel workers) on the loopback interface only
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1"}


def dequantized_float_copy(float_model, quant_model, config: QuantConfig):
    """``float_model`` (the weights before quantization) with every layer that ``quant_model``
    quantized replaced by its dequantized weight, in input column order."""
    out = copy.deepcopy(float_model)
    untie_if_quantizing_head(out, config)
    for name, mod in quant_model.named_modules():
        if not isinstance(mod, QuantLinear):
            continue
        p = mod.packed()  # compact scales and zero points decoded
        w = dequantize_packed(p.qweight, p.scales, p.zeros, bits=mod.bits, group_size=mod.group_size,
                              in_features=mod.in_features)
        if mod.perm is not None:  # stored column j holds input column perm[j]
            w = torch.empty_like(w).index_copy_(1, mod.perm.long(), w)
        if mod.rot_signs is not None:  # the codes are those of W R: the float layer is W = (W R) R^T
            w = unrotate(w.float(), unpack_signs(mod.rot_signs, mod.in_features))
        lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
        lin.weight.data.copy_(w)
        if mod.bias is not None:
            lin.bias.data.copy_(mod.bias)
        set_submodule(out, name, lin)
    return out


def run_greedy(runs: dict[str, dict], prompts: list[str], max_tokens: int, work: Path,
               timeout: float = 900, score_texts: list[str] = (), env: dict[str, str] | None = None
               ) -> dict[str, dict]:
    """Greedy generations for ``runs`` (name -> {"path", "dtype", "quantization", ...}), all in one child
    process. A model that fails gets ``{"error": ...}`` (with the child's log) instead of results, so
    that only the tests using it fail (:func:`result`); so does every model the child never reached."""
    spec = {"models": list(runs.values()), "prompts": prompts, "max_tokens": max_tokens,
            "score_texts": list(score_texts)}
    (work / "spec.json").write_text(json.dumps(spec))
    out = work / "out.json"
    try:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("vllm_greedy.py")), str(work / "spec.json"), str(out)],
            env=os.environ | ENGINE_ENV | (env or {}), capture_output=True, text=True, timeout=timeout,
        )
        log, why = proc.stderr, f"exited with {proc.returncode}"
    except subprocess.TimeoutExpired as e:
        log, why = e.stderr or b"", f"timed out after {timeout} s"
        log = log.decode(errors="replace") if isinstance(log, bytes) else log
    (work / "child.log").write_text(log)
    log = log_excerpt(log) + f"\n(whole log: {work / 'child.log'})"
    done = json.loads(out.read_text()) if out.exists() else []
    results = {}
    for i, name in enumerate(runs):
        r = done[i] if i < len(done) else {"error": f"the vLLM child {why} before reaching this model"}
        if "error" in r:
            r = {"error": f"{r['error']}\n--- child log ---\n{log}"}
        results[name] = r
    return results


def log_excerpt(log: str, first: int = 6000, last: int = 3000) -> str:
    """The part of a vLLM child's log that says why it failed: its first traceback (a worker's, where the
    root cause is; the engine's own error only says "see the stack trace above") and the log's end."""
    at = log.find("Traceback (most recent call last)")
    if at < 0 or len(log) - at <= first + last:
        return log[-(first + last):] if at < 0 else log[at:]
    return f"{log[at:at + first]}\n[...]\n{log[-last:]}"


def result(results: dict[str, dict], name: str) -> dict:
    """One model's greedy results; fails the calling test (only it) if that model's run failed."""
    r = results[name]
    if "error" in r:
        pytest.fail(f"vLLM run of {name} failed: {r['error']}", pytrace=False)
    return r


_PROBE = r"""
import json, sys
import torch
from vllm.platforms import current_platform
current_platform.import_kernels()
op = sys.argv[1]
libs = sorted({line.split()[-1] for line in open("/proc/self/maps") if "/vllm/_C" in line})
model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(json.dumps({"has_op": hasattr(torch.ops._C, op), "libs": [l.rsplit("/", 1)[-1] for l in libs],
                  "cpu": model, "avx512": torch.cpu._is_avx512_supported()}))
"""


@functools.lru_cache(maxsize=None)
def missing_vllm_op(op: str) -> str | None:
    """None when the installed vLLM's native library on this CPU has ``torch.ops._C.<op>``; otherwise
    the reason to skip a test that needs it, naming the op, vLLM's library and the CPU.

    Asked of a fresh child process that loads vLLM's kernels exactly as vLLM's engine does (vllm-cpu
    picks ``_C``, ``_C_AVX512`` or ``_C_AVX2`` from the CPU's features, and the AVX2 one lacks ops)."""
    proc = subprocess.run([sys.executable, "-c", _PROBE, op], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"probing vLLM's native ops failed:\n{proc.stderr[-3000:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    if info["has_op"]:
        return None
    simulated = " (simulated: LLMQUANT_TEST_VLLM_CPU=avx2)" if os.environ.get("LLMQUANT_TEST_VLLM_CPU") else ""
    return (f"vLLM's native op torch.ops._C.{op} is missing from this vllm-cpu build's library "
            f"{'/'.join(info['libs']) or '(none loaded)'}, which vLLM loads on this CPU ({info['cpu']}, "
            f"AVX-512: {'yes' if info['avx512'] else 'no'}{simulated})")
