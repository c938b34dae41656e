"""Input rotation (``rotation="hadamard"``): the transform, the stored format, the quantizers that use it,
checkpoints that carry it, and the places that refuse it."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import llmquant
from llmquant import CheckpointError, QuantConfig, QuantConfigError, QuantLinear
from llmquant.cli.commands import checkpoint_info, format_info
from llmquant.formats.packing import dequantize_packed
from llmquant.formats.rotation import (
    BLOCK, hadamard, layer_signs, pack_signs, rotate, rotate_hessian, rotatable, unpack_signs, unrotate,
)
from llmquant.quantizers.rtn import quantize_weight_rtn

from ..conftest import build_tiny_llama

IDS = torch.tensor([[1, 345, 2001, 77, 9000, 12, 4242, 31337]])


# --- the transform and its stored signs ------------------------------------------------------------
def test_hadamard_is_the_normalized_sylvester_matrix():
    h = hadamard(torch.float64)
    assert h.shape == (BLOCK, BLOCK)
    torch.testing.assert_close(h @ h.T, torch.eye(BLOCK, dtype=torch.float64))
    torch.testing.assert_close(h, h.T)
    s = math.sqrt(BLOCK)
    assert torch.all(h[0] == 1 / s) and torch.all(h[:, 0] == 1 / s)
    assert h[1, :4].tolist() == [1 / s, -1 / s, 1 / s, -1 / s]  # H_2n = [[H, H], [H, -H]]
    assert h[64, 63].item() == 1 / s and h[64, 64].item() == -1 / s


def test_signs_golden_bytes_and_roundtrip():
    neg = torch.zeros(256, dtype=torch.bool)
    neg[[0, 9, 255]] = True
    packed = pack_signs(neg)
    assert packed.dtype == torch.uint8 and packed.shape == (32,)
    assert packed[0].item() == 0x01 and packed[1].item() == 0x02 and packed[31].item() == 0x80
    assert int(packed.sum()) == 0x01 + 0x02 + 0x80
    d = unpack_signs(packed, 256)
    assert d[0] == -1 and d[9] == -1 and d[255] == -1 and int((d == 1).sum()) == 253
    with pytest.raises(ValueError, match=r"rot_signs: expected uint8 \[32\]"):
        unpack_signs(packed[:-1], 256)


def test_layer_signs_are_deterministic_per_name():
    a = layer_signs("model.layers.0.mlp.down_proj", 384)
    assert torch.equal(a, layer_signs("model.layers.0.mlp.down_proj", 384))
    assert not torch.equal(a, layer_signs("model.layers.1.mlp.down_proj", 384))
    d = unpack_signs(a, 384)
    assert 100 < int((d < 0).sum()) < 284  # random signs, not all alike
    # layers that read one input (vLLM fuses them) share their signs, so a fused layer rotates once
    qkv = [layer_signs(f"model.layers.0.self_attn.{p}_proj", 384) for p in "qkv"]
    assert all(torch.equal(qkv[0], t) for t in qkv[1:])
    assert torch.equal(layer_signs("model.layers.0.mlp.gate_proj", 384), layer_signs("model.layers.0.mlp.up_proj", 384))
    assert not torch.equal(qkv[0], layer_signs("model.layers.0.self_attn.o_proj", 384))
    assert not torch.equal(qkv[0], layer_signs("model.layers.1.self_attn.q_proj", 384))


@pytest.mark.parametrize("k", [128, 384, 640])
def test_rotation_is_orthogonal_and_preserves_products(k):
    torch.manual_seed(0)
    d = unpack_signs(layer_signs("x", k), k, torch.float64)
    x, w = torch.randn(5, k, dtype=torch.float64), torch.randn(7, k, dtype=torch.float64)
    torch.testing.assert_close(rotate(x, d) @ rotate(w, d).T, x @ w.T)
    torch.testing.assert_close(unrotate(rotate(x, d), d), x)
    X = torch.randn(50, k, dtype=torch.float64)
    torch.testing.assert_close(rotate_hessian(X.T @ X, d), rotate(X, d).T @ rotate(X, d))
    xb = x.to(torch.bfloat16)  # low precision: rotated in fp32, returned in the input's dtype
    assert rotate(xb, d).dtype == torch.bfloat16
    torch.testing.assert_close(rotate(xb, d).double(), rotate(xb.double(), d), rtol=1e-2, atol=1e-2)


def test_rotatable():
    assert rotatable(128) and rotatable(640) and not rotatable(96) and not rotatable(64) and not rotatable(200)


def test_golden_rotated_layer():
    """Pins the definition x' = x diag(d) B, W' = W diag(d) B: a weight that reads only column 0 becomes,
    rotated, the constant row d_0 / sqrt(128); RTN stores it as all-maximal (d_0 = 1) or all-minimal codes."""
    w = torch.zeros(2, 128)
    w[:, 0] = 1.0
    for first_negative, code in ((False, 15), (True, 1)):  # sym int4 g128: zero point 8, grid [-7, 7] * s
        neg = torch.zeros(128, dtype=torch.bool)
        neg[0] = first_negative
        signs = pack_signs(neg)
        wr = rotate(w, unpack_signs(signs, 128))
        torch.testing.assert_close(wr, torch.full((2, 128), (-1.0 if first_negative else 1.0) / math.sqrt(128)))
        packed = quantize_weight_rtn(wr, llmquant.config.LayerQuant(4, 128, True))
        codes = (packed.qweight.view(torch.uint8).view(2, -1))
        nib = torch.stack([codes & 15, codes >> 4], -1).reshape(2, -1)
        assert torch.all(nib == code), nib
        # the stored row is constant c ~ d_0 / sqrt(128) (up to the grid's rounding), so the rotated layer
        # computes c sqrt(128) d_0 x_0: column 0 again, scaled by the grid's error alone
        c = dequantize_packed(packed.qweight, packed.scales, None, bits=4, group_size=128, in_features=128)[0, 0]
        mod = QuantLinear.from_packed(packed, None, rot_signs=signs)
        x = torch.randn(3, 128)
        gain = float(c) * math.sqrt(128) * (-1.0 if first_negative else 1.0)
        assert 0.9 < gain <= 1.0
        torch.testing.assert_close(mod(x), (gain * x[:, :1]).expand(3, 2), rtol=1e-4, atol=1e-4)


# --- the module -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotated_quant_linear_matches_reference(dtype):
    torch.manual_seed(0)
    n, k = 72, 384
    w = torch.randn(n, k) * 0.05
    signs = layer_signs("layer", k)
    d = unpack_signs(signs, k)
    packed = quantize_weight_rtn(rotate(w, d), llmquant.config.LayerQuant(4, 128, False))
    bias = torch.randn(n)
    mod = QuantLinear.from_packed(packed, bias, rot_signs=signs)
    x = torch.randn(2, 5, k).to(dtype)
    wq = dequantize_packed(packed.qweight, packed.scales, packed.zeros, bits=4, group_size=128, in_features=k)
    ref = F.linear(rotate(x.float(), d), wq, bias)  # the stored codes multiply the rotated input
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(mod(x).float(), ref, **tol)
    # ... and stand for the unrotated weight W R^T
    torch.testing.assert_close(F.linear(x.float(), unrotate(wq, d), bias), ref, rtol=1e-4, atol=1e-4)
    assert "rotation=hadamard" in repr(mod)
    assert mod.weight_bytes() == QuantLinear.from_packed(packed, bias).weight_bytes() + k // 8
    with pytest.raises(ValueError, match="multiple of 128"):
        QuantLinear(96, 8, llmquant.config.LayerQuant(4, 32, True), bias=False, rotated=True)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_siblings_that_share_signs_rotate_their_input_once(mode, monkeypatch):
    """q/k/v (one sign vector) called on one tensor rotate it once; another tensor, other signs, or an
    in-place change of x (tracked outside inference mode) rotate again, and every output is the layer's own."""
    import llmquant.modules.quant_linear as ql

    calls = []
    real = ql.rotate_input
    monkeypatch.setattr(ql, "rotate_input", lambda x, d: calls.append(1) or real(x, d))
    k = 256
    g = torch.Generator().manual_seed(0)
    mods = {}
    for p in ("q", "k", "v", "o"):
        signs = layer_signs(f"model.layers.0.self_attn.{p}_proj", k)
        w = torch.randn(32, k, generator=g) * 0.05
        packed = quantize_weight_rtn(rotate(w, unpack_signs(signs, k)), llmquant.config.LayerQuant(4, 128, True))
        mods[p] = QuantLinear.from_packed(packed, None, rot_signs=signs)
    x = torch.randn(3, k, generator=g)
    ctx = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    with ctx():
        alone = {p: mods[p](x.clone()) for p in mods}  # every call a fresh tensor: 4 rotations
        assert len(calls) == 4
        calls.clear()
        shared = {p: mods[p](x) for p in ("q", "k", "v")}
        assert len(calls) == 1
        for p in shared:
            assert torch.equal(shared[p], alone[p])
        assert torch.equal(mods["o"](x), alone["o"]) and len(calls) == 2  # other signs
        assert torch.equal(mods["q"](x), alone["q"]) and len(calls) == 3
        if mode == "no_grad":  # an in-place change of x is seen
            x.mul_(2)
            torch.testing.assert_close(mods["k"](x), 2 * alone["k"], rtol=1e-5, atol=1e-5)
            assert len(calls) == 4
    # nothing outlives the input: once x is freed, so is its rotation
    import gc
    import weakref

    kept = weakref.ref(ql._last_rotation.entry[3])
    del x
    gc.collect()
    assert kept() is None and not ql._last_rotation.entry


def _outlier_weight(n=64, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[:, torch.randint(0, k, (6,), generator=g)] *= 25  # a few outlier input channels, as in real LLM layers
    return w


@pytest.mark.parametrize("bits, most", [(2, 0.95), (3, 0.7), (4, 0.5)])  # measured: 0.87, 0.58, 0.33
def test_rotation_lowers_rtn_error_on_outlier_weights(bits, most):
    w = _outlier_weight()
    scheme = llmquant.config.LayerQuant(bits, 128, True)
    k = w.shape[1]

    def err(wq):
        return float((wq - w).norm() / w.norm())

    plain = quantize_weight_rtn(w, scheme)
    plain_w = dequantize_packed(plain.qweight, plain.scales, None, bits=bits, group_size=128, in_features=k)
    d = unpack_signs(layer_signs("w", k), k)
    rot = quantize_weight_rtn(rotate(w, d), scheme)
    rot_w = unrotate(dequantize_packed(rot.qweight, rot.scales, None, bits=bits, group_size=128, in_features=k), d)
    assert err(rot_w) < most * err(plain_w), (err(rot_w), err(plain_w))


# --- quantizers, checkpoints ----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_rotated_checkpoint_roundtrip(tmp_path, tokenizer, method):
    model = build_tiny_llama(hidden=128, inter=256, bias=True)
    config = QuantConfig(method=method, bits=3, group_size=64, rotation="hadamard")
    torch.manual_seed(0)
    cal = [torch.randint(0, 49152, (1, 64)) for _ in range(4)] if method == "gptq" else None
    llmquant.quantize(model, config, calibration=cal, progress=False)
    mods = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(mods) == 14 and all(m.rot_signs is not None for m in mods.values())  # every K is 128 or 256
    for n, m in mods.items():
        assert torch.equal(m.rot_signs, layer_signs(n, m.in_features))
    with torch.no_grad():
        logits = model(IDS).logits
    path = tmp_path / "q"
    llmquant.save_quantized(model, path, tokenizer, dtype=None)
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert cfg["rotation"] == "hadamard" and cfg == config.to_dict()
    assert "model.layers.0.mlp.down_proj.rot_signs" in load_file(path / "model.safetensors")
    back = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, logits, rtol=1e-5, atol=1e-5)
    info = checkpoint_info(path)
    assert all(lay["rotated"] for lay in info["layers"])
    assert "input rotation (hadamard, llmquant.formats.rotation): 14 of 14 layers" in format_info(info)


def test_rotated_gptq_beats_plain_gptq_on_outlier_layer():
    """GPTQ on W R with the Hessian R^T H R: lower output error than on W, for a layer with outlier columns."""
    from torch import nn

    from llmquant.quantizers.gptq import GPTQ

    w = _outlier_weight(seed=1)
    lin = nn.Linear(256, 64, bias=False)
    lin.weight.data = w
    x = torch.randn(512, 256, generator=torch.Generator().manual_seed(2))
    errs = {}
    for rotated in (False, True):
        g = GPTQ(lin, "layer")
        g.add_batch(x)
        signs = layer_signs("layer", 256) if rotated else None
        packed, st = g.quantize(llmquant.config.LayerQuant(3, 128, True), act_order=True, rot_signs=signs)
        q = g.quantized_weight  # the weight the codes stand for, in the input basis
        wq = dequantize_packed(packed.qweight, packed.scales, None, bits=3, group_size=128, in_features=256)
        if packed.perm is not None:
            wq = wq[:, torch.argsort(packed.perm.long())]
        if rotated:
            wq = unrotate(wq, unpack_signs(signs, 256))
        torch.testing.assert_close(q, wq, rtol=1e-4, atol=1e-5)
        errs[rotated] = float(((x @ (w - q).T) ** 2).sum() / ((x @ w.T) ** 2).sum())
        assert st["rel_err"] == pytest.approx(errs[rotated], rel=1e-3)
    assert errs[True] < 0.8 * errs[False], errs


def test_layers_that_cannot_rotate_stay_plain(tmp_path, tokenizer):
    model = build_tiny_llama(hidden=128, inter=160)  # down_proj: K=160, not whole 128-column blocks
    llmquant.quantize(model, QuantConfig(bits=4, group_size=32, rotation="hadamard", quantize_lm_head=True), progress=False)
    mods = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert mods["model.layers.0.mlp.down_proj"].rot_signs is None
    assert mods["lm_head"].rot_signs is None  # the output layer is never rotated
    assert mods["model.layers.0.mlp.up_proj"].rot_signs is not None
    path = tmp_path / "q"
    llmquant.save_quantized(model, path, tokenizer, dtype=None)
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(IDS).logits,
                                   model(IDS).logits, rtol=1e-5, atol=1e-5)


# --- bad input ------------------------------------------------------------------------------------
def test_bad_rotation_configs():
    with pytest.raises(QuantConfigError, match="rotation must be None or one of"):
        QuantConfig(rotation="givens")
    assert QuantConfig(rotation="hadamard").to_dict()["rotation"] == "hadamard"
    assert "rotation" not in QuantConfig().to_dict()  # older checkpoints' configs stay as they were
    from llmquant.distill.qat import prepare_qat

    with pytest.raises(ValueError, match="QAT does not train rotated layers"):
        prepare_qat(build_tiny_llama(hidden=128, inter=256), QuantConfig(rotation="hadamard"))


def _rotated_ckpt(tmp_path, tokenizer):
    model = build_tiny_llama(hidden=128, inter=256)
    llmquant.quantize(model, QuantConfig(bits=4, group_size=128, rotation="hadamard"), progress=False)
    path = tmp_path / "q"
    llmquant.save_quantized(model, path, tokenizer, dtype=None)
    return path


def test_checkpoint_rotation_mismatches_fail_loudly(tmp_path, tokenizer):
    path = _rotated_ckpt(tmp_path, tokenizer)
    layer = "model.layers.1.mlp.down_proj"
    f = path / "model.safetensors"
    tensors = load_file(f)
    # the config names the rotation, a layer lacks its signs
    t2 = dict(tensors)
    t2.pop(f"{layer}.rot_signs")
    save_file(t2, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{layer}\.rot_signs: missing"):
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    # signs stored, but the config lost its rotation: running the codes unrotated would be silently wrong
    save_file(tensors, f, metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    del cfg["quantization_config"]["rotation"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"rot_signs: the layer is stored rotated"):
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_exports_refuse_rotated_checkpoints(tmp_path, tokenizer):
    from llmquant.export.common import ExportError, read_checkpoint

    path = _rotated_ckpt(tmp_path, tokenizer)
    with pytest.raises(ExportError, match="stores rotated layers"):
        read_checkpoint(path)


def test_training_keeps_the_rotation():
    from llmquant.distill.trainable import close_after_training, open_for_training

    model = build_tiny_llama(hidden=128, inter=256)
    llmquant.quantize(model, QuantConfig(bits=4, group_size=64, rotation="hadamard"), progress=False)
    with torch.no_grad():
        before = model(IDS).logits
    open_for_training(model)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, before, rtol=1e-4, atol=1e-4)
    close_after_training(model)
    mods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert mods and all(m.rot_signs is not None for m in mods)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, before, rtol=1e-5, atol=1e-5)


def test_mixed_precision_prices_the_signs():
    model = build_tiny_llama(hidden=128, inter=256)
    torch.manual_seed(0)
    cal = [torch.randint(0, 49152, (1, 64)) for _ in range(4)]
    s = llmquant.quantize(model, QuantConfig(method="gptq", target_bpw=3.5, rotation="hadamard"), calibration=cal,
                          progress=False)
    mods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert all(m.rot_signs is not None for m in mods)
    bpw = 8 * sum(m.weight_bytes() for m in mods) / sum(m.in_features * m.out_features for m in mods)
    assert bpw <= 3.5 and s["mixed"]["allocation"]["bpw"] == pytest.approx(bpw)


@pytest.mark.parametrize("shape", [(1, 640), (3, 5, 256), (7, 4096)])
def test_native_rotation_matches_torch(shape):
    from llmquant.kernels import cpu_native
    from llmquant.kernels.cpu import rotate_input

    native, why = cpu_native.load()
    if native is None:
        pytest.skip(f"native CPU library not loaded: {why}")
    torch.manual_seed(0)
    k = shape[-1]
    d = unpack_signs(layer_signs("n", k), k)
    x = torch.randn(*shape)
    x0 = x.clone()
    torch.testing.assert_close(rotate_input(x, d), rotate(x.double(), d.double()).float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(x, x0)  # the input is not changed
    xb = x.to(torch.bfloat16)
    assert rotate_input(xb, d).dtype == torch.bfloat16
    torch.testing.assert_close(rotate_input(xb, d), rotate(xb, d), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="positive multiple of 128"):
        native.hadamard128(torch.zeros(2, 96), torch.ones(96))
