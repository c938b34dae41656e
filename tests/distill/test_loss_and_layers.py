"""The distillation loss, the trainable quantized layer and QAT against their exact definitions."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import llmquant
from llmquant import LayerQuant, QuantConfig
from llmquant.distill import KDLoss, TopK, prepare_qat
from llmquant.distill.blockwise import _token_mean_square, relative_error
from llmquant.distill.loss import IGNORE, next_token_labels, topk_kl
from llmquant.distill.trainable import SignDescent, TrainableQuantLinear, close_after_training, open_for_training
from llmquant.kernels.reference import dequant_matmul_ref
from llmquant.quantizers.rtn import quantize_weight_rtn
from llmquant.modules.quant_linear import QuantLinear


# --- loss -----------------------------------------------------------------------------------------
def _logits(seed, shape=(2, 5, 40), scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_kl_with_the_whole_vocabulary_is_the_kl(temperature):
    t, s = _logits(0), _logits(1)
    target = TopK.from_logits(t, k=40, temperature=temperature)
    ours = topk_kl(s, target, temperature)
    p = F.log_softmax(t / temperature, -1)
    q = F.log_softmax(s / temperature, -1)
    ref = (p.exp() * (p - q)).sum(-1)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 39), seed=st.integers(0, 1000))
def test_topk_kl_is_a_kl_between_coarsenings(k, seed):
    """Coarsening cannot increase a KL divergence, and it stays non-negative."""
    t, s = _logits(seed), _logits(seed + 1)
    full = topk_kl(s, TopK.from_logits(t, 40, 1.0), 1.0)
    part = topk_kl(s, TopK.from_logits(t, k, 1.0), 1.0)
    assert (part >= -1e-5).all()
    assert (part <= full + 1e-5).all()


def test_topk_kl_is_zero_when_the_student_is_the_teacher():
    t = _logits(3)
    assert topk_kl(t, TopK.from_logits(t, 8, 1.0), 1.0).abs().max() < 1e-5


def test_kd_loss_mixes_kl_and_cross_entropy():
    t, s = _logits(4), _logits(5).requires_grad_()
    ids = torch.randint(0, 40, (2, 5))
    labels = next_token_labels(ids)
    assert (labels[:, -1] == IGNORE).all() and torch.equal(labels[:, :-1], ids[:, 1:])
    target = TopK.from_logits(t, 40, 2.0)
    ce_only, _ = KDLoss(1.0, 0.0)(s, None, labels)
    torch.testing.assert_close(ce_only, F.cross_entropy(s.flatten(0, 1), labels.flatten(), ignore_index=IGNORE))
    mixed, parts = KDLoss(2.0, 0.25)(s, target, labels)
    kl = topk_kl(s, target, 2.0)[:, :-1].mean()
    torch.testing.assert_close(mixed, 0.25 * 4 * kl + 0.75 * ce_only, rtol=1e-5, atol=1e-6)
    mixed.backward()
    assert torch.isfinite(s.grad).all()
    with pytest.raises(ValueError, match="alpha"):
        KDLoss(1.0, 1.5)
    with pytest.raises(ValueError, match="teacher targets"):
        KDLoss(1.0, 0.5)(s, None, labels)


def test_recover_defaults_to_half_cross_entropy_and_distill_to_kl_alone():
    """recover's loss defaults to alpha 0.5 on every road in (CLI, Python, a recipe's flat fields); a
    recipe's job gets its own defaults under the fields it names (recover 100 steps, distill 200)."""
    from llmquant.cli.main import build_parser
    from llmquant.distill import DistillConfig, RecoverConfig
    from llmquant.distill.recipes import config_from_flat

    p = build_parser()
    assert p.parse_args(["recover", "ckpt", "out", "--teacher", "t"]).alpha == 0.5
    assert p.parse_args(["recover", "ckpt", "out", "--teacher", "t", "--alpha", "1"]).alpha == 1.0
    assert p.parse_args(["distill", "t", "s", "out"]).alpha == 1.0
    assert RecoverConfig().data.alpha == 0.5 and DistillConfig().data.alpha == 1.0
    rc = config_from_flat(RecoverConfig, {"method": "recover", "lr": 3e-3, "data": "wiki"})
    assert (rc.data.alpha, rc.data.source, rc.train.steps, rc.lr) == (0.5, "wiki", 100, 3e-3)
    dc = config_from_flat(DistillConfig, {"alpha": 0.7, "max_minutes": 5})
    assert (dc.data.alpha, dc.train.steps, dc.train.max_minutes) == (0.7, 200, 5)


# --- the trainable quantized layer ----------------------------------------------------------------
SCHEMES = [LayerQuant(4, 32, True), LayerQuant(3, 64, False), LayerQuant(2, 32, False), LayerQuant(8, -1, True)]


def _layer(scheme, n=24, k=72, perm=False, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    p = quantize_weight_rtn(w, scheme)
    if perm:
        p.perm = torch.randperm(k, generator=g).to(torch.int32)
    b = torch.randn(n, generator=g) if bias else None
    return QuantLinear.from_packed(p, b, sym=scheme.sym)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@pytest.mark.parametrize("perm", [False, True])
@pytest.mark.parametrize("train_codes", [False, True])
def test_trainable_layer_starts_as_the_stored_layer(scheme, perm, train_codes):
    q = _layer(scheme, perm=perm)
    t = TrainableQuantLinear(q, train_codes=train_codes)
    x = torch.randn(3, 72)
    torch.testing.assert_close(t(x), dequant_matmul_ref(x, q.packed(), q.bias), rtol=1e-5, atol=1e-5)
    back = t.to_quant_linear()
    for name in ("qweight", "scales", "zeros", "perm", "bias"):
        a, b = getattr(back, name), getattr(q, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a if name != "qweight" else back.packed_qweight(), b if name != "qweight" else q.packed_qweight()), name


@pytest.mark.parametrize("train_codes", [False, True])
def test_trained_layer_stores_what_it_computed(train_codes):
    """After training steps, the packed layer (fp16 scales, codes) computes exactly the trained forward."""
    from llmquant.formats.packing import unpack_rows

    q = _layer(LayerQuant(3, 32, False), perm=True)
    t = TrainableQuantLinear(q, train_codes=train_codes)
    opts = [torch.optim.Adam([t.log_scale], lr=0.05)]
    if train_codes:  # offsets in quantization steps: past 0.5 a code moves; never past 1
        opts.append(SignDescent([t.offset], lr=0.3))
    x, y = torch.randn(16, 72), torch.randn(16, 24)
    for _ in range(5):
        for o in opts:
            o.zero_grad()
        F.mse_loss(t(x), y).backward()
        for o in opts:
            o.step()
    assert t.log_scale.abs().max() > 0
    if train_codes:
        assert t.offset.abs().max() == 1.0  # 5 steps of 0.3, clamped at the bound
    back = t.to_quant_linear()
    back.validate()
    with torch.no_grad():
        torch.testing.assert_close(dequant_matmul_ref(x, back.packed(), back.bias), t(x), rtol=1e-5, atol=1e-5)
    # codes move only when they train, and then by at most one step
    assert torch.equal(back.packed_qweight(), q.packed_qweight()) == (not train_codes)
    moved = (unpack_rows(back.packed().qweight, 3, 72).int() - unpack_rows(q.packed().qweight, 3, 72).int()).abs()
    assert moved.max() == int(train_codes)
    if train_codes:  # freezing keeps the moved codes as the stored ones, and the same forward
        with torch.no_grad():
            y_before = t(x)
            t.freeze_codes()
            assert t.offset is None and "offset" not in dict(t.named_parameters())
            torch.testing.assert_close(t(x), y_before, rtol=0, atol=0)
        assert torch.equal(t.to_quant_linear().packed_qweight(), back.packed_qweight())


def test_sign_descent_moves_by_the_learning_rate_and_stays_in_bounds():
    p = torch.nn.Parameter(torch.tensor([0.0, 0.0, 0.95, -0.95, 0.3]))
    opt = SignDescent([p], lr=0.1)
    p.grad = torch.tensor([2.0, -1e-9, -5.0, 3.0, 0.0])
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([-0.1, 0.1, 1.0, -1.0, 0.3]))
    with pytest.raises(ValueError, match="must be positive"):
        SignDescent([p], lr=0.0)


def test_open_and_close_a_model(tiny_llama):
    llmquant.quantize(tiny_llama, QuantConfig(bits=4, group_size=32), progress=False)
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        before = tiny_llama(ids).logits
    n = open_for_training(tiny_llama)
    assert n == 14 and not any(isinstance(m, QuantLinear) for m in tiny_llama.modules())
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama(ids).logits, before, rtol=1e-4, atol=1e-4)
    assert close_after_training(tiny_llama) == 14
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama(ids).logits, before, rtol=1e-4, atol=1e-4)


# --- QAT ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [QuantConfig(method="rtn", bits=4, group_size=32),
                                    QuantConfig(method="rtn", bits=3, group_size=64, sym=False)], ids=["int4", "int3a"])
def test_qat_model_quantizes_to_its_fake_quantized_outputs(tiny_llama, config):
    """Train with fake quantization, then quantize with the same config: same logits (1e-5 relative)."""
    assert prepare_qat(tiny_llama, config) == 14
    ids = torch.randint(0, 49152, (2, 16))
    opt = torch.optim.AdamW([p for p in tiny_llama.parameters()], lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        loss = tiny_llama(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
    assert tiny_llama.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        fake = tiny_llama(ids).logits
    llmquant.quantize(tiny_llama, config, progress=False)
    assert sum(isinstance(m, QuantLinear) for m in tiny_llama.modules()) == 14
    with torch.no_grad():
        real = tiny_llama(ids).logits
    rel = (real - fake).abs().max() / fake.abs().max()
    assert rel < 1e-5, rel


def test_qat_refuses_grids_it_cannot_reproduce(tiny_llama):
    with pytest.raises(ValueError, match="method='rtn'"):
        prepare_qat(tiny_llama, QuantConfig(method="gptq", bits=4))
    with pytest.raises(ValueError, match="clip_search"):
        prepare_qat(tiny_llama, QuantConfig(method="rtn", bits=4, clip_search=True))


def test_block_loss_weighs_every_token_alike():
    """One token a thousand times larger than the rest (a "massive activation") must not hide the others' error."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 8, 16, generator=g)
    y[:, 0] *= 1000
    err = 0.1 * torch.randn(2, 8, 16, generator=g)
    err[:, 0] = 0  # the large token is exact, every other token is off by about 10%
    got = relative_error(y + err, y, _token_mean_square(y))
    want = (err.pow(2).mean(-1) / y.pow(2).mean(-1)).mean()
    torch.testing.assert_close(got, want)
    assert 0.005 < float(got) < 0.02  # 7/8 of the tokens at ~1% squared error
    whole = (err.pow(2).mean() / y.pow(2).mean()).item()
    assert whole < 1e-6  # what a whole-tensor relative error would have read
    # an all-zero target token is counted without dividing by zero
    y[1, 3] = 0
    assert torch.isfinite(relative_error(y + err, y, _token_mean_square(y)))


def test_log1mexp_has_finite_gradients_next_to_zero():
    """The student's top-k mass can round to just below 1 in float32 (log-mass -1e-9): log(1 - exp(x))
    and its gradient must stay finite there (a NaN gradient stopped gemma3-270m training at step 185)."""
    from llmquant.distill.loss import _log1mexp

    x = torch.tensor([0.0, -1e-12, -1e-9, -3e-8, -1e-4, -0.5, -0.7, -5.0, -80.0], requires_grad=True)
    y = _log1mexp(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all(), (y, x.grad)
    far = x.detach()[4:]  # above -1e-7 the remaining mass is floored at 1e-7
    torch.testing.assert_close(y.detach()[4:], torch.log(-torch.expm1(far.double())).float(), rtol=1e-5, atol=1e-6)
