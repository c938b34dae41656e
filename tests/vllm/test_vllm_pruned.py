"""vLLM loads a structurally pruned SmolLM2 (fewer layers, KV heads, query heads per group and MLP
channels; ``head_dim`` explicit in the reduced config) and scores text as transformers does, and serves
its INT4 version through the plugin with the log-probabilities llmquant's own kernels give.

Marked ``slow`` and ``vllm`` (the built-in model is converted on first use; two engine start-ups).
"""
from __future__ import annotations

import pytest
import torch

try:
    import vllm  # noqa: F401
    import vllm.model_executor  # the tests/vllm folder is not vLLM
except ImportError as e:
    pytest.skip(f"vLLM is not importable ({e}); run in the venv made by .ci/vllm-setup.sh", allow_module_level=True)

from .helpers import result, run_greedy

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TEXT = "The history of the city begins in the Roman period, when a small settlement grew around the river."


def test_pruned_smollm2_scores_in_vllm_as_in_transformers_and_serves_int4(tmp_path):
    import llmquant
    from llmquant import QuantConfig
    from llmquant.models import load_model
    from llmquant.prune import StructuredConfig
    from llmquant.prune.jobs import prune

    out = tmp_path / "pruned"
    cfg = StructuredConfig(keep=None, intermediate_size=1024, heads_per_group=2, kv_heads=2, num_layers=24,
                           axes=("mlp", "heads", "kv_heads", "layers"), nsamples=4, seqlen=128)
    summary = prune("smollm2-135m", str(out), cfg, progress=False)
    assert summary["shape"] == {"layers": 24, "kv_heads": 2, "heads_per_group": 2, "intermediate": 1024}
    model, tok = load_model(str(out))
    ids = tok(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float(), -1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
    llmquant.quantize(model, QuantConfig(bits=4, group_size=64), progress=False)
    llmquant.save_quantized(model, tmp_path / "int4", tok)
    with torch.no_grad():  # llmquant's own kernels on the INT4 model: what the plugin must reproduce
        logp_q = torch.log_softmax(model(ids).logits.float(), -1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]

    runs = {"f": {"path": str(out), "dtype": "float32"},
            "q": {"path": str(tmp_path / "int4"), "dtype": "float32", "quantization": "llmquant"}}
    res = run_greedy(runs, ["The capital of France is"], 4, tmp_path, score_texts=[TEXT])
    f, q = result(res, "f"), result(res, "q")
    torch.testing.assert_close(torch.tensor(f["scores"][0]), logp, rtol=0, atol=2e-3)
    assert len(q["token_ids"][0]) == 4
    # the INT4 checkpoint of the pruned model scores in vLLM (plugin) as in transformers (llmquant's kernels)
    torch.testing.assert_close(torch.tensor(q["scores"][0]), logp_q, rtol=0, atol=5e-3)
