"""The spine on the real built-in models: convert, quantize, save, reload, score. Minutes, not seconds."""
import json

import pytest
import torch

import llmquant
from llmquant import QuantConfig, QuantLinear
from llmquant.cli.commands import checkpoint_info
from llmquant.evals.perplexity import perplexity
from llmquant.models import bos_for_raw_text, load_model

pytestmark = pytest.mark.slow

PROTOCOL = dict(context=512, max_tokens=4096, progress=False)


@pytest.mark.parametrize(
    "name,config,max_increase",
    [
        # SmolLM2's GGUF weights already sit on a 4-bit grid in blocks of 32: g32 loses little
        ("smollm2-135m", QuantConfig(bits=4, group_size=32, sym=False), 0.10),
        # Gemma is the quality benchmark: RTN INT4 g128 costs tens of percent (GPTQ closes most of it)
        ("gemma3-270m", QuantConfig(bits=4, group_size=128), 0.80),
    ],
)
def test_quantize_save_reload_score(tmp_path, name, config, max_increase):
    model, tok = load_model(name)
    bos = bos_for_raw_text(name, tok)
    base = perplexity(model, tok, bos=bos, **PROTOCOL)
    llmquant.quantize(model, config, progress=False)
    ids = tok("The quick brown fox jumps over the lazy dog. " * 4, return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = model(ids).logits
    llmquant.save_quantized(model, tmp_path / "q", tok)
    del model
    again, _ = load_model(str(tmp_path / "q"))
    assert sum(isinstance(m, QuantLinear) for m in again.modules()) > 0
    with torch.inference_mode():
        torch.testing.assert_close(again(ids).logits, logits, rtol=1e-5, atol=1e-4)
    q = perplexity(again, tok, bos=bos, **PROTOCOL)
    assert q["tokens_scored"] == base["tokens_scored"]
    assert base["ppl"] <= q["ppl"] * 1.02, (base["ppl"], q["ppl"])  # quantization should not help
    assert q["ppl"] <= base["ppl"] * (1 + max_increase), (base["ppl"], q["ppl"])
    info = checkpoint_info(tmp_path / "q")
    assert info["linear_bytes"] <= 0.3 * info["linear_fp16_bytes_approx"]
    if name == "gemma3-270m":
        assert (tmp_path / "q" / "GEMMA_TERMS.html").exists()
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["bits"] == 4
