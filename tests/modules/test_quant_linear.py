import pytest
import torch

from llmquant.config import LayerQuant
from llmquant.formats.packing import dequantize_packed
from llmquant.modules.quant_linear import CheckpointError, QuantLinear
from llmquant.quantizers.rtn import quantize_weight_rtn


def _layer(n=48, k=80, scheme=LayerQuant(4, 32, False), perm=False, bias=True):
    torch.manual_seed(0)
    w = torch.randn(n, k)
    p = quantize_weight_rtn(w, scheme)
    if perm:
        p.perm = torch.randperm(k).to(torch.int32)
    b = torch.randn(n) if bias else None
    return QuantLinear.from_packed(p, b), p, b


@pytest.mark.parametrize("perm", [False, True])
@pytest.mark.parametrize("shape", [(5,), (2, 3), (1, 1, 4)])
def test_forward_is_dequant_matmul(perm, shape):
    mod, p, b = _layer(perm=perm)
    x = torch.randn(*shape, 80)
    w = dequantize_packed(p.qweight, p.scales, p.zeros, bits=4, group_size=32, in_features=80)
    xs = x[..., p.perm.long()] if perm else x
    torch.testing.assert_close(mod(x), xs @ w.T + b, rtol=1e-5, atol=1e-5)
    assert mod(x).shape == (*shape, 48)


def test_wrong_input_width():
    mod, _, _ = _layer()
    with pytest.raises(ValueError, match="expected K=80"):
        mod(torch.randn(2, 81))


def test_state_dict_holds_only_packed_tensors():
    mod, _, _ = _layer(perm=True)
    mod(torch.randn(1, 80))  # builds kernel state, which must not be saved
    assert set(mod.state_dict()) == {"qweight", "scales", "zeros", "perm", "bias"}
    sym, _, _ = _layer(scheme=LayerQuant(4, 32, True), bias=False)
    assert set(sym.state_dict()) == {"qweight", "scales"}


def test_validate_catches_bad_values():
    mod, _, _ = _layer(perm=True)
    mod.validate("m")
    mod.perm[3] = mod.perm[4]
    with pytest.raises(CheckpointError, match="m.perm: not a permutation"):
        mod.validate("m")
    mod, _, _ = _layer()
    mod.scales[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match="m.scales: 1 non-finite"):
        mod.validate("m")


def test_load_state_dict_refreshes_kernel_state():
    a, _, _ = _layer()
    torch.manual_seed(1)
    b = QuantLinear.from_packed(quantize_weight_rtn(torch.randn(48, 80), LayerQuant(4, 32, False)), torch.zeros(48))
    x = torch.randn(3, 80)
    ya = a(x)
    a.load_state_dict(b.state_dict())
    torch.testing.assert_close(a(x), b(x))
    assert not torch.allclose(ya, a(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_model_to_dtype_keeps_fp16_scales(dtype):
    mod, p, b = _layer()
    mod.to(dtype)
    assert mod.scales.dtype == torch.float16 and torch.equal(mod.scales, p.scales)
    assert mod.bias.dtype == dtype
    x = torch.randn(3, 80, dtype=dtype)
    w = dequantize_packed(p.qweight, p.scales, p.zeros, bits=4, group_size=32, in_features=80)
    ref = (x.float() @ w.T + b.to(dtype).float())
    err = (mod(x).float() - ref).abs().mean() / ref.abs().mean()
    assert err < (1e-2 if dtype == torch.bfloat16 else 1e-5)


# --- prepared at load, one copy of the codes -------------------------------------------------------
def test_kernel_prepared_once_and_codes_kept_once(tmp_path, monkeypatch, caplog):
    """After llmquant.quantize (and after loading a checkpoint) every layer has its kernel prepared and,
    on the CPU kernel, no second copy of the codes: qweight is released and rebuilt exactly on demand
    (state_dict, packed(), .to())."""
    import logging

    import llmquant
    from llmquant.config import QuantConfig
    from llmquant.kernels import cpu_native
    from llmquant.kernels.cpu import CpuKernel
    from transformers import AutoModelForCausalLM

    from ..conftest import build_tiny_llama

    if cpu_native.load()[0] is None:
        pytest.skip("native CPU library unavailable")
    model = build_tiny_llama(hidden=128, inter=256)
    summary = llmquant.quantize(model, QuantConfig(bits=4, group_size=64), progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert summary["kernels"] == {f"cpu ({cpu_native.load()[0].isa})": len(layers)}
    assert all(m.qweight_released and m.qweight.numel() == 0 for m in layers)
    sd = model.state_dict()
    q0 = layers[0]
    assert sd["model.layers.0.self_attn.q_proj.qweight"].shape == q0.expected_tensors()["qweight"][0]
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        ref = model(ids).logits
    model.save_pretrained(tmp_path / "q")
    # the first forward after loading prepares nothing: the loader did it
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    assert all(m.qweight_released for m in back.modules() if isinstance(m, QuantLinear))
    monkeypatch.setattr(CpuKernel, "prepare", lambda *a, **k: pytest.fail("prepared in the forward"))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref)
    monkeypatch.undo()
    # another dtype: the codes come back from the layout, a new layout is prepared
    back.to(torch.bfloat16)
    with torch.no_grad():
        out = back(ids).logits.float()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    # falling back to the reference kernel on the CPU is said once, not per layer
    monkeypatch.setenv("LLMQUANT_DISABLE_KERNELS", "cpu")
    for m in back.modules():
        if isinstance(m, QuantLinear):
            m.invalidate_kernel()
    from llmquant.modules import quant_linear

    monkeypatch.setattr(quant_linear, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="llmquant.modules.quant_linear"), torch.no_grad():
        back(ids)
    assert sum("slow reference kernel" in r.getMessage() for r in caplog.records) == 1


def test_prepared_layer_copies_and_pickles():
    """A layer whose kernel is prepared (codes released into the kernel's layout) deep-copies and
    pickles with its stored tensors; the copy computes the same."""
    import copy
    import pickle

    mod, p, b = _layer(n=40, k=256, scheme=LayerQuant(4, 128, True))
    x = torch.randn(3, 256)
    y = mod(x)
    for twin in (copy.deepcopy(mod), pickle.loads(pickle.dumps(mod))):
        assert twin._kernel_cache == {} and not twin.qweight_released
        assert torch.equal(twin.qweight, p.qweight)
        torch.testing.assert_close(twin(x), y)
