"""The vLLM plugin on a real model: SmolLM2-135M (30 layers, hidden 576, 9 heads of 64, tied embedding).

K = 576 is not a multiple of the group size 128, so every attention and gate/up layer has a ragged
last group (NG = 5): the case GPTQ loaders refuse and llmquant's format allows. vLLM serving the
RTN 4-bit checkpoint through the plugin must give the greedy tokens of vLLM serving the same weights
dequantized to float32, and the log-probabilities of those tokens within 1e-3 (float32 in both; 30
layers of GEMMs that sum in different orders; measured: 1.3e-5).

Marked ``slow`` and ``vllm``: the built-in model is converted on first use (cached), and the reference
kernel dequantizes every weight at every step (about 2 s a token on two loaded cores).
"""
from __future__ import annotations

import copy

import pytest
import torch

try:
    import vllm  # noqa: F401
    import vllm.model_executor  # the tests/vllm folder is not vLLM
except ImportError as e:
    pytest.skip(f"vLLM is not importable ({e}); run in the venv made by .ci/vllm-setup.sh", allow_module_level=True)

import llmquant
from llmquant import QuantConfig
from llmquant.models import resolve

from .helpers import dequantized_float_copy, result, run_greedy

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    "]
MAX_TOKENS = 8


@pytest.mark.parametrize("rotation", [None, "hadamard"])
def test_smollm2_with_ragged_groups_matches_its_dequantized_float_model(tmp_path, rotation):
    """Also rotated (rotation='hadamard'): K = 576 is not whole 128-column blocks, so only down_proj
    (K = 1536) is stored rotated, and the plugin must rotate its input as the embedded engine does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    float_model = copy.deepcopy(model)
    config = QuantConfig(bits=4, group_size=128, sym=False, rotation=rotation)
    llmquant.quantize(model, config, progress=False)
    assert model.model.layers[0].self_attn.q_proj.scales.shape == (576, 5)  # ragged: 576 = 4*128 + 64
    layer = model.model.layers[0]
    assert (layer.mlp.down_proj.rot_signs is not None) == (rotation is not None) and layer.mlp.up_proj.rot_signs is None
    llmquant.save_quantized(model, tmp_path / "q", tokenizer)
    dequantized_float_copy(float_model, model, config).save_pretrained(tmp_path / "f")
    tokenizer.save_pretrained(tmp_path / "f")

    runs = {"q": {"path": str(tmp_path / "q"), "dtype": "float32"},
            "f": {"path": str(tmp_path / "f"), "dtype": "float32"}}
    out = run_greedy(runs, PROMPTS, MAX_TOKENS, tmp_path)
    q, f = result(out, "q"), result(out, "f")
    assert q["token_ids"] == f["token_ids"]
    for lq, lf in zip(q["logprobs"], f["logprobs"]):
        torch.testing.assert_close(torch.tensor(lq), torch.tensor(lf), rtol=0, atol=1e-3)
    assert "Paris" in q["texts"][0]  # a 4-bit SmolLM2 still knows
