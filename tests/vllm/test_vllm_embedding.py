"""vLLM serves checkpoints whose embedding table is quantized (``quantize_embedding``), with the log-
probabilities llmquant's own modules give: SmolLM2 (vLLM's Llama: a ParallelLMHead tied to the
embedding shares its packed tensors) and Gemma 3 (vLLM computes the logits with the embedding layer
itself, scaled by its normalizer in the model code).

Marked ``slow`` and ``vllm`` (two built-in models, one engine start-up each).
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


def test_quantized_embedding_checkpoints_score_in_vllm_as_in_llmquant(tmp_path):
    import llmquant
    from llmquant import QuantConfig
    from llmquant.models import load_model
    from llmquant.modules.quant_embedding import QuantEmbedding, TiedQuantHead

    runs, expect = {}, {}
    for name, group in (("smollm2-135m", 64), ("gemma3-270m", 128)):
        model, tok = load_model(name)
        llmquant.quantize(model, QuantConfig(bits=4, group_size=group, quantize_lm_head=True, quantize_embedding=True),
                          progress=False)
        assert isinstance(model.get_input_embeddings(), QuantEmbedding) and isinstance(model.lm_head, TiedQuantHead)
        path = llmquant.save_quantized(model, tmp_path / name, tok)
        ids = tok(TEXT, return_tensors="pt").input_ids
        with torch.no_grad():
            expect[name] = torch.log_softmax(model(ids).logits.float(), -1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
        runs[name] = {"path": str(path), "dtype": "float32", "quantization": "llmquant"}
        del model
    res = run_greedy(runs, ["The capital of France is"], 4, tmp_path, score_texts=[TEXT])
    for name in runs:
        r = result(res, name)
        assert len(r["token_ids"][0]) == 4
        torch.testing.assert_close(torch.tensor(r["scores"][0]), expect[name], rtol=0, atol=5e-3, msg=name)
