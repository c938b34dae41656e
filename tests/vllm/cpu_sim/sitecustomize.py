"""Test harness only (never installed): with ``LLMQUANT_TEST_VLLM_CPU=avx2``, make every Python process
started by the vLLM tests see an AVX2-only CPU the way vLLM asks, through ``torch.cpu._is_*``.

vLLM's CPU build picks its native library from these answers (``vllm._C`` with AVX512-BF16,
``vllm._C_AVX512``, else ``vllm._C_AVX2``) and so do its attention and GEMM paths. On an AVX-512
machine this loads and runs the very library an AVX2-only machine gets, whose missing ops (such as
``cpu_gemm_wna16``, the kernel of vLLM's gptq method) the tests must then cope with. The folder is put
on ``PYTHONPATH`` by ``tests/vllm/conftest.py``; Python imports ``sitecustomize`` at start-up.
"""
import os

if os.environ.get("LLMQUANT_TEST_VLLM_CPU") == "avx2":
    import torch.cpu

    def _no() -> bool:
        return False

    for _name in ("_is_avx512_supported", "_is_avx512_bf16_supported", "_is_avx512_vnni_supported",
                  "_is_avx512_fp16_supported", "_is_amx_tile_supported", "_is_amx_fp16_supported"):
        if hasattr(torch.cpu, _name):
            setattr(torch.cpu, _name, _no)
