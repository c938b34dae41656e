"""Helpers of the vLLM end-to-end tests: the float twin of a quantized model, and greedy runs of
checkpoints in a child vLLM process (``vllm_greedy.py``)."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from llmquant import QuantConfig
from llmquant.formats.packing import dequantize_packed
from llmquant.modules.quant_linear import QuantLinear
from llmquant.quantizers.model import set_submodule, untie_if_quantizing_head

#: the engine in the child's own process (no EngineCore process), 1 GiB of KV cache
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}


def dequantized_float_copy(float_model, quant_model, config: QuantConfig):
    """``float_model`` (the weights before quantization) with every layer that ``quant_model``
    quantized replaced by its dequantized weight, in input column order."""
    out = copy.deepcopy(float_model)
    untie_if_quantizing_head(out, config)
    for name, mod in quant_model.named_modules():
        if not isinstance(mod, QuantLinear):
            continue
        w = dequantize_packed(mod.qweight, mod.scales, mod.zeros, bits=mod.bits, group_size=mod.group_size,
                              in_features=mod.in_features)
        if mod.perm is not None:  # stored column j holds input column perm[j]
            w = torch.empty_like(w).index_copy_(1, mod.perm.long(), w)
        lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
        lin.weight.data.copy_(w)
        if mod.bias is not None:
            lin.bias.data.copy_(mod.bias)
        set_submodule(out, name, lin)
    return out


def run_greedy(runs: dict[str, dict], prompts: list[str], max_tokens: int, work: Path,
               timeout: float = 900) -> dict[str, dict]:
    """Greedy generations for ``runs`` (name -> {"path", "dtype", "quantization"}), all in one child
    process; fails the test with the child's log if any model failed."""
    spec = {"models": list(runs.values()), "prompts": prompts, "max_tokens": max_tokens}
    (work / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("vllm_greedy.py")), str(work / "spec.json"),
         str(work / "out.json")],
        env=os.environ | ENGINE_ENV, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = dict(zip(runs, json.loads((work / "out.json").read_text())))
    for name, r in results.items():
        assert "error" not in r, f"{name}: {r['error']}\n{proc.stderr[-5000:]}"
    return results
