"""The GPTQ-layout export dequantizes to exactly the weights of our native format."""
import json

import pytest
import torch
from safetensors.torch import load_file

import llmquant
from llmquant import QuantConfig
from llmquant.export.gptq import ExportError, dequantize_gptq, export_gptq_checkpoint, to_gptq_tensors
from llmquant.formats.packing import dequantize_packed
from llmquant.quantizers.rtn import quantize_weight_rtn
from llmquant.config import LayerQuant

from ..conftest import build_tiny_llama


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_layer_export_matches_native(bits, act_order):
    torch.manual_seed(bits)
    n, k, g = 64, 256, 64
    w = torch.randn(n, k)
    p = quantize_weight_rtn(w, LayerQuant(bits, g, True))
    perm = torch.randperm(k).to(torch.int32) if act_order else None
    native = dequantize_packed(p.qweight, p.scales, None, bits=bits, group_size=g, in_features=k)
    if perm is not None:  # native stored column j is input column perm[j]
        expect = torch.empty_like(native)
        expect[:, perm.long()] = native
    else:
        expect = native
    t = to_gptq_tensors(p.qweight, p.scales, None, perm, bits=bits, group_size=g, in_features=k)
    assert t["qweight"].shape == (k * bits // 32, n) and t["qzeros"].shape == (k // g, n * bits // 32)
    assert t["scales"].shape == (k // g, n) and t["g_idx"].shape == (k,)
    assert torch.equal(dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits), expect)


def test_sym_4bit_zeros_are_0x77777777():
    p = quantize_weight_rtn(torch.randn(32, 128), LayerQuant(4, 128, True))
    t = to_gptq_tensors(p.qweight, p.scales, None, None, bits=4, group_size=128, in_features=128)
    assert (t["qzeros"] == 0x77777777).all()


def test_refusals():
    p = quantize_weight_rtn(torch.randn(32, 96), LayerQuant(4, 64, True))
    with pytest.raises(ExportError, match="not a multiple of group_size"):
        to_gptq_tensors(p.qweight, p.scales, None, None, bits=4, group_size=64, in_features=96, name="x")
    w = torch.rand(32, 128)  # all positive: asymmetric zero point 0
    p = quantize_weight_rtn(w, LayerQuant(4, 128, False))
    with pytest.raises(ExportError, match="zero point 0"):
        to_gptq_tensors(p.qweight, p.scales, p.zeros, None, bits=4, group_size=128, in_features=128, name="x")


def test_checkpoint_export(tmp_path, tokenizer):
    model = build_tiny_llama(hidden=128, inter=256)
    llmquant.quantize(model, QuantConfig(bits=4, group_size=64), progress=False)
    llmquant.save_quantized(model, tmp_path / "native", tokenizer)
    out = export_gptq_checkpoint(tmp_path / "native", tmp_path / "gptq")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg == {**cfg, "quant_method": "gptq", "bits": 4, "group_size": 64, "sym": True, "desc_act": False}
    t = load_file(out / "model.safetensors")
    layer = "model.layers.0.mlp.gate_proj"
    w = dequantize_gptq(t[f"{layer}.qweight"], t[f"{layer}.qzeros"], t[f"{layer}.scales"], t[f"{layer}.g_idx"], 4)
    q = model.get_submodule(layer)
    native = dequantize_packed(q.packed_qweight(), q.scales, None, bits=4, group_size=64, in_features=128)
    assert torch.equal(w, native)
    assert (out / "tokenizer.json").exists()
