"""GPTQ on one linear layer: better than RTN on the calibration inputs, act-order better still, and the
packed result is exactly the weight GPTQ computed."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from llmquant.config import LayerQuant
from llmquant.formats.packing import dequantize_packed
from llmquant.modules.quant_linear import QuantLinear
from llmquant.quantizers.gptq import GPTQ, GPTQError
from llmquant.quantizers.rtn import group_qparams, quantize_weight_rtn

N, K, M = 64, 200, 1024  # K = 200: ragged last group for G = 32 and G = 128


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def layer_and_inputs(seed: int = 0, n: int = N, k: int = K, m: int = M) -> tuple[nn.Linear, torch.Tensor]:
    """A random layer and correlated inputs whose features differ in scale (up to 10x), as in LLMs."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) / k**0.5)
        lin.bias.copy_(torch.randn(n, generator=g))
    mix = torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(m, k, generator=g) @ mix + 0.3 * torch.randn(m, k, generator=g)
    x = x * torch.logspace(-0.5, 0.5, k)[torch.randperm(k, generator=g)]
    return lin, x


def output_error(w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor) -> float:
    ref = x @ w.T
    return float(((ref - x @ wq.T) ** 2).sum() / (ref**2).sum())


def run_gptq(lin, x, scheme, **kw):
    g = GPTQ(lin, name="test")
    for part in x.split(300):  # several batches: exercises the running average
        g.add_batch(part)
    packed, stats = g.quantize(scheme, **kw)
    return g, packed, stats


@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_beats_rtn_and_act_order_beats_gptq(bits, sym, group_size):
    lin, x = layer_and_inputs()
    w = lin.weight.detach()
    scheme = LayerQuant(bits, group_size, sym)
    rtn = quantize_weight_rtn(w, scheme)
    w_rtn = dequantize_packed(rtn.qweight, rtn.scales, rtn.zeros, bits=bits, group_size=group_size, in_features=K)
    e_rtn = output_error(w, w_rtn, x)

    errs = {}
    for act_order, static in [(False, False), (True, False), (True, True)]:
        g, _, stats = run_gptq(lin, x, scheme, act_order=act_order, static_groups=static)
        e = output_error(w, g.quantized_weight, x)
        # the reported error is the same quantity, computed from the Hessian
        assert stats["rel_err"] == pytest.approx(e, rel=1e-3)
        errs[act_order, static] = e

    plain = errs[False, False]
    assert plain < 0.95 * e_rtn, (plain, e_rtn)
    assert errs[True, False] < 0.9 * plain, errs
    assert errs[True, True] < 0.9 * plain, errs


@pytest.mark.parametrize(
    "act_order,static_groups", [(False, False), (True, False), (True, True)], ids=["plain", "act_order", "static"]
)
@pytest.mark.parametrize("bits,sym,group_size", [(4, True, 128), (3, False, 32), (2, True, -1), (8, False, 32)])
def test_packed_is_exactly_the_gptq_weight(bits, sym, group_size, act_order, static_groups):
    lin, x = layer_and_inputs(seed=1)
    scheme = LayerQuant(bits, group_size, sym)
    g, packed, _ = run_gptq(lin, x, scheme, act_order=act_order, static_groups=static_groups)
    wq = g.quantized_weight  # input column order

    # act-order without static groups is stored permuted (perm); with static groups in input order
    assert (packed.perm is not None) == (act_order and not static_groups)
    stored = dequantize_packed(
        packed.qweight, packed.scales, packed.zeros, bits=bits, group_size=group_size, in_features=K
    )
    expected = wq if packed.perm is None else wq[:, packed.perm.long()]
    assert torch.equal(stored, expected)

    # through the layer that runs it (reference kernel): y = x @ Wq.T + b
    ql = QuantLinear.from_packed(packed, lin.bias.detach())
    ql.validate()
    y = ql(x[:50])
    torch.testing.assert_close(y, x[:50] @ wq.T + lin.bias.detach(), rtol=1e-5, atol=1e-5)


def test_act_order_permutation_is_descending_hessian_diagonal():
    lin, x = layer_and_inputs(seed=2)
    g, packed, _ = run_gptq(lin, x, LayerQuant(4, 32, True), act_order=True)
    diag = torch.diagonal(g.H)
    assert torch.equal(packed.perm.long(), torch.argsort(diag, descending=True, stable=True))


def test_static_groups_fix_the_grid_on_the_input_weights():
    lin, x = layer_and_inputs(seed=3)
    scheme = LayerQuant(4, 32, False)
    _, packed, _ = run_gptq(lin, x, scheme, act_order=True, static_groups=True)
    scale, zero = group_qparams(lin.weight.detach(), scheme)
    assert torch.equal(packed.scales, scale.to(torch.float16))
    assert torch.equal(packed.zeros, zero.to(torch.uint8))
    # on-the-fly groups see the error-updated weights, so they differ
    _, dynamic, _ = run_gptq(lin, x, scheme, act_order=False)
    assert not torch.equal(dynamic.scales, packed.scales)


@pytest.mark.parametrize("k", [K, 1100])  # 1100: accumulated by blocks of 512 (upper triangle only)
def test_hessian_is_running_average_of_2xtx(k):
    lin, x = layer_and_inputs(seed=4, m=500, k=k, n=8)
    g = GPTQ(lin)
    for part in (x[:7], x[7:300].view(293, 1, k), x[300:]):  # any leading shape is tokens
        g.add_batch(part)
    assert g.nsamples == 500
    torch.testing.assert_close(g.H, 2 * x.T @ x / 500, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g.H, g.H.T, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=f"expected K={k}"):
        g.add_batch(torch.zeros(3, k - 1))


def test_block_size_does_not_change_the_result():
    lin, x = layer_and_inputs(seed=5)
    scheme = LayerQuant(4, 32, True)
    ref = run_gptq(lin, x, scheme, block_size=128)[0].quantized_weight
    for bs in (1, 7, 32, 100, 1000):  # 7 and 100 are not multiples of the group size
        other = run_gptq(lin, x, scheme, block_size=bs)[0].quantized_weight
        # lazy batching is exact up to float rounding: a handful of codes may flip at most
        changed = (other != ref).float().mean().item()
        assert changed < 0.005, (bs, changed)


def test_row_slabs_give_the_same_result(monkeypatch):
    # rows are independent in GPTQ; tall layers (an lm_head) are solved in slabs of ROW_CHUNK rows
    from llmquant.quantizers import gptq

    lin, x = layer_and_inputs(seed=11)
    scheme = LayerQuant(3, 32, False)
    whole, packed_whole, _ = run_gptq(lin, x, scheme, act_order=True)
    monkeypatch.setattr(gptq, "ROW_CHUNK", 24)  # 64 rows: slabs of 24, 24, 16
    slabs, packed_slabs, _ = run_gptq(lin, x, scheme, act_order=True)
    assert (slabs.quantized_weight != whole.quantized_weight).float().mean().item() < 0.005
    assert torch.equal(packed_slabs.perm, packed_whole.perm)


def test_dead_inputs_get_zero_weight():
    lin, x = layer_and_inputs(seed=6)
    x[:, [3, 77, 150]] = 0
    g, _, stats = run_gptq(lin, x, LayerQuant(4, 128, False), act_order=True)
    assert stats["dead_columns"] == 3
    assert torch.equal(g.quantized_weight[:, [3, 77, 150]], torch.zeros(N, 3))
    assert torch.isfinite(g.quantized_weight).all()


def test_conv1d_layer():
    # GPT-2's Conv1D stores the weight as [K, N]
    lin, x = layer_and_inputs(seed=7)
    conv = Conv1D(N, K)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.T)
        conv.bias.copy_(lin.bias)
    _, packed, _ = run_gptq(conv, x, LayerQuant(4, 32, True))
    assert (packed.out_features, packed.in_features) == (N, K)
    _, packed2, _ = run_gptq(lin, x, LayerQuant(4, 32, True))
    assert torch.equal(packed.qweight, packed2.qweight)


def test_cholesky_failure_retries_with_more_damping(caplog):
    lin, x = layer_and_inputs(seed=8, m=50)  # 50 tokens, K = 200: H is singular
    g = GPTQ(lin, name="rank-deficient")
    g.add_batch(x)
    with caplog.at_level(logging.WARNING, logger="llmquant.quantizers.gptq"):
        _, stats = g.quantize(LayerQuant(4, 32, True), damp_percent=0.0)
    assert stats["damp_percent"] > 0
    assert any("not positive definite" in r.getMessage() for r in caplog.records)
    assert torch.isfinite(g.quantized_weight).all()


def test_hopeless_hessian_raises_after_retries(caplog):
    lin, _ = layer_and_inputs(seed=9)
    g = GPTQ(lin, name="broken")
    g.add_batch(torch.randn(10, K))
    g.H = -torch.eye(K)  # negative definite: no amount of dampening (relative to its diagonal) helps
    with caplog.at_level(logging.WARNING, logger="llmquant.quantizers.gptq"), pytest.raises(
        GPTQError, match="broken.*not positive definite"
    ):
        g.quantize(LayerQuant(4, 32, True))
    assert sum("retrying" in r.getMessage() for r in caplog.records) == 3


def test_errors_are_clear():
    lin, _ = layer_and_inputs(seed=10)
    g = GPTQ(lin, name="lonely")
    with pytest.raises(GPTQError, match="lonely: no calibration inputs"):
        g.quantize(LayerQuant(4, 32, True))
    g.add_batch(torch.full((4, K), float("nan")))
    with pytest.raises(GPTQError, match="non-finite"):
        g.quantize(LayerQuant(4, 32, True))


@pytest.mark.parametrize("bits,sym,group_size", [(4, True, 128), (3, False, 32), (4, False, -1)])
@pytest.mark.parametrize("act_order,static_groups", [(False, False), (True, False), (True, True)])
def test_clip_search_lowers_the_error_and_packs_exactly(bits, sym, group_size, act_order, static_groups):
    """Searching each group's clipping range (weighted by the Hessian diagonal) gives a lower output
    error than min/max ranges, and what is stored is still exactly the weight GPTQ computed."""
    lin, x = layer_and_inputs(seed=2)
    scheme = LayerQuant(bits, group_size, sym)
    w = lin.weight.detach()
    base, _, _ = run_gptq(lin, x, scheme, act_order=act_order, static_groups=static_groups)
    g, packed, stats = run_gptq(lin, x, scheme, act_order=act_order, static_groups=static_groups, clip_search=True)
    e_base, e_clip = output_error(w, base.quantized_weight, x), output_error(w, g.quantized_weight, x)
    assert e_clip < 0.97 * e_base, (e_clip, e_base)
    assert stats["rel_err"] == pytest.approx(e_clip, rel=1e-3)
    stored = dequantize_packed(packed.qweight, packed.scales, packed.zeros, bits=bits, group_size=group_size, in_features=K)
    expected = g.quantized_weight if packed.perm is None else g.quantized_weight[:, packed.perm.long()]
    assert torch.equal(stored, expected)


# --- float targets: aim at what the float model computes ------------------------------------------
def float_and_quantized_inputs(seed: int = 7) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """A layer, its inputs in the float model, and the perturbed inputs earlier quantized layers give it."""
    lin, xf = layer_and_inputs(seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    drift = torch.randn(K, K, generator=g) * 0.05 / K**0.5  # an error correlated with the inputs
    x = xf + xf @ drift + 0.02 * torch.randn(xf.shape, generator=g) * xf.std(0)
    return lin, xf, x


def test_float_target_cross_term_is_a_running_average():
    lin, xf, x = float_and_quantized_inputs()
    g = GPTQ(lin)
    for a, b in zip(x.split(300), xf.split(300)):
        g.add_batch(a, float_inp=b)
    torch.testing.assert_close(g._c, 2 * (xf - x).T @ x / M, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="every batch or with none"):
        g.add_batch(x[:3])
    with pytest.raises(ValueError, match="float_inp has shape"):
        g.add_batch(x[:3], float_inp=x[:4])
    plain = GPTQ(lin)
    plain.add_batch(x[:10])
    with pytest.raises(ValueError, match="every batch or with none"):
        plain.add_batch(x[:10], float_inp=x[:10])
    with pytest.raises(GPTQError, match="float model's inputs"):
        plain.quantize(LayerQuant(4, 32, True), float_target=1.0)


@pytest.mark.parametrize("bits,sym,group_size", [(8, True, 128), (4, True, 32), (3, False, 128), (2, True, -1)])
def test_float_target_lowers_the_error_against_the_float_outputs(bits, sym, group_size):
    lin, xf, x = float_and_quantized_inputs()
    w = lin.weight.detach()
    scheme = LayerQuant(bits, group_size, sym)

    def float_error(wq):  # ||X_f W^T - X Q^T||^2 / ||X_f W^T||^2: what the model sees
        ref = xf @ w.T
        return float(((ref - x @ wq.T) ** 2).sum() / (ref**2).sum())

    plain = run_gptq(lin, x, scheme, act_order=True)[0].quantized_weight
    g = GPTQ(lin)
    for a, b in zip(x.split(300), xf.split(300)):
        g.add_batch(a, float_inp=b)
    packed, stats = g.quantize(scheme, act_order=True, float_target=1.0)
    assert stats["target_shift"] > 0
    # plain GPTQ keeps all of the error that reached the layer (W itself has it); the float target removes
    # most of it, at every width
    reached, e_plain, e_target = float_error(w), float_error(plain), float_error(g.quantized_weight)
    assert e_plain > reached
    assert e_plain - e_target > 0.5 * reached, (reached, e_plain, e_target)
    # the packed codes are the weight it computed
    stored = dequantize_packed(packed.qweight, packed.scales, packed.zeros, bits=bits, group_size=group_size, in_features=K)
    assert torch.equal(stored, g.quantized_weight[:, packed.perm.long()])


def test_float_target_with_the_same_inputs_is_plain_gptq():
    lin, x = layer_and_inputs(seed=8)
    scheme = LayerQuant(3, 32, True)
    plain = run_gptq(lin, x, scheme, act_order=True)[0].quantized_weight
    g = GPTQ(lin)
    for part in x.split(300):
        g.add_batch(part, float_inp=part)
    _, stats = g.quantize(scheme, act_order=True, float_target=1.0)
    assert stats["target_shift"] == 0
    assert torch.equal(g.quantized_weight, plain)
