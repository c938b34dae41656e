"""A real tensor-parallel vLLM engine on the CPU build: two worker processes (one core each, gloo over
the loopback interface) serving a tiny llmquant checkpoint through the plugin, sym and asym. Its greedy
tokens must be tensor-parallel 1's: the column-parallel layers (fused q/k/v, gate/up) split N, the
row-parallel ones (o_proj, down_proj) split K by whole groups and packing blocks, and vLLM all-reduces
their partial sums. (``test_vllm_linear.py`` checks the shards layer by layer in one process.)

Act-order layers are not in these checkpoints: their ``perm`` gathers input columns from every rank, so
the plugin refuses them as row-parallel layers (tested there)."""
from __future__ import annotations

import copy
import os

import pytest
import torch

try:
    import vllm  # noqa: F401
    import vllm.model_executor  # the tests/vllm folder is not vLLM
except ImportError as e:
    pytest.skip(f"vLLM is not importable ({e}); run in the venv made by .ci/vllm-setup.sh", allow_module_level=True)

import llmquant
from llmquant import QuantConfig

from .helpers import result, run_greedy
from .test_vllm_serving import MAX_TOKENS, PROMPTS, SCORE_TEXT, tiny_llama

pytestmark = pytest.mark.vllm

CONFIGS = {
    "sym": QuantConfig(bits=4, group_size=32),
    # asymmetric, 8-bit per-channel down_proj (split along K per channel), 2-bit o_proj
    "asym": QuantConfig(bits=4, group_size=32, sym=False,
                        overrides={"*.down_proj": {"bits": 8, "group_size": -1}, "*.o_proj": {"bits": 2}}),
}


@pytest.fixture(scope="module")
def tp_runs(tokenizer, tmp_path_factory):
    if (os.cpu_count() or 1) < 2:
        pytest.skip(f"tensor parallelism 2 on vLLM's CPU build binds one core per rank; this machine has {os.cpu_count()}")
    root = tmp_path_factory.mktemp("vllm_tp")
    runs = {}
    for i, (name, config) in enumerate(CONFIGS.items()):
        model = tiny_llama(tokenizer, seed=10 + i)
        llmquant.quantize(model, config, progress=False)
        path = str(llmquant.save_quantized(copy.deepcopy(model), root / name, tokenizer))
        runs[f"{name}-tp1"] = {"path": path, "dtype": "float32"}
        runs[f"{name}-tp2"] = {"path": path, "dtype": "float32", "tensor_parallel_size": 2}
    # vLLM's CPU workers bind their OpenMP threads: one core per rank, the first two cores
    return run_greedy(runs, PROMPTS, MAX_TOKENS, root, score_texts=[SCORE_TEXT],
                      env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tensor_parallel_2_generates_the_tokens_of_tensor_parallel_1(tp_runs, name):
    one, two = result(tp_runs, f"{name}-tp1"), result(tp_runs, f"{name}-tp2")
    assert two["token_ids"] == one["token_ids"]
    # fp32 both; only the order of the all-reduced partial sums differs
    torch.testing.assert_close(torch.tensor(two["scores"][0]), torch.tensor(one["scores"][0]), rtol=0, atol=1e-3)
    assert len({tuple(t) for t in two["token_ids"]}) == len(PROMPTS)
