"""Unstructured and N:M pruning: exact sparsity and patterns, SparseGPT beats Wanda beats magnitude on
output error, SparseGPT + GPTQ in one pass keeps the zeros and writes a loadable checkpoint."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from llmquant.config import LayerQuant, QuantConfig, QuantConfigError
from llmquant.prune import PruneConfigError, SparsityConfig
from llmquant.prune.sparse import nm_mask, sparsegpt_layer
from llmquant.quantizers.gptq import GPTQ
from tests.quantizers.tiny_models import tiny_calibration, tiny_model


@settings(max_examples=40, deadline=None)
@given(r=st.integers(1, 6), k=st.integers(1, 23), nm=st.sampled_from([(2, 4), (1, 4), (4, 8), (1, 2)]),
       seed=st.integers(0, 99))
def test_nm_mask_keeps_the_n_largest_of_every_m(r, k, nm, seed):
    n, m = nm
    score = torch.rand(r, k, generator=torch.Generator().manual_seed(seed))
    mask = nm_mask(score, n, m)
    for j in range(0, k, m):
        block, pruned = score[:, j:j + m], mask[:, j:j + m]
        kept = (~pruned).sum(1)
        assert (kept == min(n, block.shape[1])).all()
        for row in range(r):
            if pruned[row].any() and (~pruned[row]).any():
                assert block[row][~pruned[row]].min() >= block[row][pruned[row]].max()


def _linear_problem(n=48, k=96, tokens=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    scale = torch.linspace(0.2, 3, k)[torch.randperm(k, generator=g)]
    x = torch.randn(tokens, k, generator=g) @ mix * scale  # correlated inputs of uneven size
    layer = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n, k, generator=g))
    gq = GPTQ(layer)
    gq.add_batch(x)
    return layer, gq, x


def _rel_err(layer, w, x):
    ref = x @ layer.weight.detach().t()
    return float(((x @ w.t() - ref) ** 2).sum() / (ref ** 2).sum())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_beats_wanda_beats_magnitude_on_output_error(pattern):
    from llmquant.prune.sparse import score_mask

    layer, gq, x = _linear_problem()
    cfg = SparsityConfig(method="sparsegpt", sparsity=0.5, pattern=pattern, block_size=32)
    w_sgpt, packed, stats = sparsegpt_layer(gq, cfg, None)
    assert packed is None
    w = layer.weight.detach()
    mag = w.masked_fill(score_mask(w.abs(), cfg, per_row=False), 0)
    wan = w.masked_fill(score_mask(w.abs() * x.norm(dim=0), cfg, per_row=True), 0)
    errs = [_rel_err(layer, t, x) for t in (w_sgpt, wan, mag)]
    assert errs[0] < errs[1] < errs[2], errs
    assert stats["rel_err"] == pytest.approx(errs[0], rel=1e-3)
    zeros = (w_sgpt == 0).float().mean().item()
    assert zeros == pytest.approx(0.5, abs=1e-6)
    if pattern == "2:4":
        assert ((w_sgpt.view(48, -1, 4) != 0).sum(-1) == 2).all()


@pytest.mark.parametrize("sym,group", [(True, 32), (False, 64)])
def test_sparsegpt_with_quantization_keeps_exact_zeros_on_the_grid(sym, group):
    from llmquant.formats.packing import dequantize_packed

    layer, gq, x = _linear_problem()
    cfg = SparsityConfig(method="sparsegpt", pattern="2:4",
                         quantize=QuantConfig(method="gptq", bits=4, group_size=group, sym=sym, act_order=False))
    w, packed, _ = sparsegpt_layer(gq, cfg, LayerQuant(4, group, sym))
    deq = dequantize_packed(packed.qweight, packed.scales, packed.zeros, bits=4, group_size=group, in_features=96)
    torch.testing.assert_close(deq, w, rtol=0, atol=1e-3)  # the solver's weight is what the codes store
    assert ((deq.view(48, -1, 4) != 0).sum(-1) <= 2).all()  # 2:4 survives (a kept weight may round to 0)
    assert (deq == 0).float().mean() >= 0.5


def _model_error(model, ref, ids):
    with torch.no_grad():
        return float(((model(ids).logits - ref) ** 2).mean())


def test_methods_on_a_model_reach_the_sparsity_and_order_as_expected():
    from llmquant.prune.jobs import finish_quantized  # noqa: F401  (the job layer imports cleanly)

    cal = tiny_calibration(16, 64)
    ids = torch.cat(tiny_calibration(4, 64, seed=7))
    base = tiny_model("llama")
    with torch.no_grad():
        ref = base(ids).logits
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = tiny_model("llama")
        cfg = SparsityConfig(method=method, sparsity=0.6)
        model, summary = cfg.get_method().apply(model, cfg, cal, False)
        assert summary["sparsity"] == pytest.approx(0.6, abs=0.01)  # rounded per row of K = 64 or 128
        for name, s in summary["layers"].items():
            w = model.get_submodule(name).weight
            assert (w == 0).float().mean().item() == pytest.approx(s, abs=1e-6)
        assert model.config.sparsity_config["pattern"] == "unstructured"
        assert (model.lm_head.weight != 0).all()  # the head is never pruned
        assert 0 < _model_error(model, ref, ids) < float("inf")
    # (which method is best is judged on real models in evals/results, not on random weights)


def test_skip_leaves_layers_dense():
    model = tiny_model("llama")
    cfg = SparsityConfig(method="wanda", pattern="2:4", skip=("*.down_proj",))
    model, summary = cfg.get_method().apply(model, cfg, tiny_calibration(4, 32), False)
    for name, s in summary["layers"].items():
        assert s == (0.0 if name.endswith("down_proj") else 0.5)


def test_sparsegpt_and_gptq_in_one_pass_writes_a_checkpoint_that_reloads(tmp_path, float_ckpt):
    from llmquant.models import load_model
    from llmquant.prune.jobs import prune

    out = tmp_path / "sparse-int4"
    cfg = SparsityConfig(method="sparsegpt", pattern="2:4", nsamples=4, seqlen=32,
                         quantize=QuantConfig(method="gptq", bits=4, group_size=32, act_order=False))
    summary = prune(str(float_ckpt), str(out), cfg, progress=False)
    assert summary["quantized_layers"] == 14
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["quantization_config"]["quant_method"] == "llmquant"
    assert cfg_json["sparsity_config"]["pattern"] == "2:4"
    model, _ = load_model(str(out))
    from llmquant.formats.packing import dequantize_packed

    q = model.model.layers[0].mlp.down_proj
    p = q.packed()
    deq = dequantize_packed(p.qweight, p.scales, p.zeros, bits=p.bits, group_size=p.group_size,
                            in_features=p.in_features)
    assert ((deq.view(deq.shape[0], -1, 4) != 0).sum(-1) <= 2).all()


def test_bad_sparsity_configs_are_refused():
    for s in (0, 1, -0.2, 1.5, True):
        with pytest.raises(PruneConfigError, match="sparsity"):
            SparsityConfig(sparsity=s)
    for p in ("4:2", "0:4", "half", "2-4"):
        with pytest.raises(PruneConfigError, match="N"):
            SparsityConfig(pattern=p)
    with pytest.raises(PruneConfigError, match="act-order"):
        SparsityConfig(pattern="2:4", quantize=QuantConfig(method="gptq", act_order=True))
    with pytest.raises(PruneConfigError, match="sparsegpt"):
        SparsityConfig(method="wanda", quantize=QuantConfig(method="gptq"))
    with pytest.raises(PruneConfigError, match="quantize_embedding is not supported in SparseGPT"):
        SparsityConfig(quantize=QuantConfig(method="gptq", quantize_embedding=True))
    with pytest.raises(PruneConfigError, match="unknown method"):
        SparsityConfig(method="nope")
    with pytest.raises(QuantConfigError, match="prune method"):
        QuantConfig(method="sparsegpt")


def test_a_quantized_model_is_refused_before_anything_changes():
    import llmquant

    model = tiny_model("llama")
    llmquant.quantize(model, QuantConfig(bits=4, group_size=32), progress=False)
    cfg = SparsityConfig(method="magnitude")
    with pytest.raises(ValueError, match="already quantized"):
        cfg.get_method().check_model(model, cfg)
