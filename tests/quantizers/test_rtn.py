import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmquant.config import LayerQuant
from llmquant.formats.packing import dequantize_packed
from llmquant.quantizers.rtn import quantize_weight_rtn

from ..conftest import build_tiny_llama


def _deq(p):
    return dequantize_packed(p.qweight, p.scales, p.zeros, bits=p.bits, group_size=p.group_size,
                             in_features=p.in_features)


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), gs=st.sampled_from([-1, 32, 64, 128]), sym=st.booleans(),
       n=st.integers(1, 6), k=st.integers(1, 300), seed=st.integers(0, 1000))
def test_error_bound(bits, gs, sym, n, k, seed):
    """Every weight lands within half a step of its group's grid (clipping aside: sym's top code)."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    p = quantize_weight_rtn(w, LayerQuant(bits, gs, sym))
    err = (_deq(p) - w).abs()
    g = k if gs == -1 else gs
    step = p.scales.float().repeat_interleave(g, dim=1)[:, :k]
    # symmetric grids clip the largest positive value by up to one step (q max = 2^b - 1 = zero + 2^(b-1) - 1);
    # asymmetric ones are shifted by the rounding of the zero point (at most half a step), so an end of
    # the range lies outside the grid by at most that plus the fp16 rounding of the scale over maxq steps
    bound = step * (1.0 if sym else 0.5 + ((1 << bits) - 1) * 2.0**-11) + 1e-6
    assert (err <= bound).all()


def test_zero_group_and_exact_grid():
    w = torch.zeros(2, 64)
    p = quantize_weight_rtn(w, LayerQuant(4, 32, True))
    assert torch.equal(_deq(p), w)
    # weights already on an asymmetric 4-bit grid (each row spans codes 0..15) are reproduced exactly
    q = torch.randint(0, 16, (3, 128))
    q[:, 0], q[:, 1] = 0, 15
    w = (q - 5).float() * 0.25
    p = quantize_weight_rtn(w, LayerQuant(4, 128, False))
    assert torch.equal(_deq(p), w)
    assert p.zeros.eq(5).all() and p.scales.eq(0.25).all()


def test_rejects_nan_and_bad_shape():
    w = torch.randn(4, 32)
    w[1, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        quantize_weight_rtn(w, LayerQuant(4, 32, True))
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        quantize_weight_rtn(torch.randn(4), LayerQuant(4, 32, True))


@pytest.mark.parametrize("bits,sym", [(2, True), (3, False), (4, True), (4, False), (8, True)])
def test_clip_search_never_loses_and_usually_wins(bits, sym):
    """qparams(clip=True) keeps, per row, the best of a grid that includes the plain min/max range:
    its weighted rounding error is never larger, and on Gaussian rows at <= 4 bits mostly smaller."""
    from llmquant.quantizers.grid import fake_quantize, qparams

    g = torch.Generator().manual_seed(bits)
    w = torch.randn(256, 128, generator=g)
    imp = torch.rand(128, generator=g) * 10
    errs = []
    for clip in (False, True):
        s, z = qparams(w, bits, sym, clip=clip, importance=imp)
        d = fake_quantize(w, s[:, None], z[:, None], bits) - w
        errs.append((d * d) @ imp)
    plain, clipped = errs
    assert (clipped <= plain * (1 + 1e-6)).all()
    if bits <= 4:
        assert (clipped < plain).float().mean() > 0.5


def test_rtn_honours_clip_search():
    """QuantConfig(clip_search=True) with RTN: the clipped grid, a lower weight error than min/max."""
    from llmquant import QuantConfig, quantize

    errs = []
    for clip in (False, True):
        model = build_tiny_llama()
        w = model.model.layers[0].mlp.down_proj.weight.detach().clone()
        quantize(model, QuantConfig(bits=4, group_size=32, clip_search=clip), progress=False)
        down = model.model.layers[0].mlp.down_proj
        errs.append(float(((down(torch.eye(w.shape[1])).T - w) ** 2).sum()))
    assert errs[1] < 0.95 * errs[0], errs
