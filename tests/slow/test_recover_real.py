"""recover on the real SmolLM2-135M: an INT3 checkpoint learns from its float teacher (minutes)."""
import pytest
import torch

import llmquant
from llmquant import QuantConfig, QuantLinear
from llmquant.distill import DataConfig, RecoverConfig, TrainConfig, recover
from llmquant.evals.perplexity import perplexity
from llmquant.models import load_model

pytestmark = pytest.mark.slow


def test_recover_smollm2_int3_lowers_kl_and_perplexity(tmp_path):
    from pydoc_data.topics import topics

    text = tmp_path / "train.txt"  # ~40 windows of 128 tokens of English prose (not WikiText-2)
    text.write_text("\n\n".join(topics[k] for k in sorted(topics))[:24000])
    model, tok = load_model("smollm2-135m")
    llmquant.quantize(model, QuantConfig(bits=3, group_size=64), progress=False)
    llmquant.save_quantized(model, tmp_path / "int3", tok)
    proto = dict(context=256, max_tokens=2048, bos=False, progress=False)
    before = perplexity(model, tok, **proto)["ppl"]
    del model
    cfg = RecoverConfig(train=TrainConfig(steps=12, grad_accum=2, optimizer="adamw8bit", eval_every=0),
                        data=DataConfig(source=str(text), seqlen=128, heldout=4, top_k=32), lr=3e-3)
    summary = recover(str(tmp_path / "int3"), str(tmp_path / "rec"), "smollm2-135m", cfg, progress=False)
    assert summary["heldout_last"]["kl"] < 0.95 * summary["heldout_first"]["kl"]
    rec, _ = load_model(str(tmp_path / "rec"))
    assert sum(isinstance(m, QuantLinear) for m in rec.modules()) == 210
    after = perplexity(rec, tok, **proto)["ppl"]
    assert after < before, (before, after)
    with torch.inference_mode():
        assert torch.isfinite(rec(torch.tensor([[1, 2, 3]])).logits).all()
