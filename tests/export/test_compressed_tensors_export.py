"""The compressed-tensors pack-quantized export, read back by the compressed-tensors library itself
(the format's reference reader) and by transformers; the vLLM tier loads it in vLLM."""
from __future__ import annotations

import json

import pytest
import torch

import llmquant
from llmquant import QuantConfig
from llmquant.config import LayerQuant
from llmquant.export.compressed_tensors import ExportError, export_compressed_tensors_checkpoint, to_ct_tensors
from llmquant.formats.packing import dequantize_packed
from llmquant.quantizers.rtn import quantize_weight_rtn

from ..conftest import build_tiny_llama

ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors (dev extra) reads the export back")
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationScheme  # noqa: E402


def _layer(n, k, scheme, perm, seed=0):
    g = torch.Generator().manual_seed(seed)
    packed = quantize_weight_rtn(torch.randn(n, k, generator=g), scheme)
    p = torch.randperm(k, generator=g).to(torch.int32) if perm else None
    return packed, p


def _ours_in_input_order(packed, perm) -> torch.Tensor:
    w = dequantize_packed(packed.qweight, packed.scales, packed.zeros, bits=packed.bits,
                          group_size=packed.group_size, in_features=packed.in_features)
    if perm is not None:
        w = torch.empty_like(w).index_copy_(1, perm.long(), w)
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("n,k,group_size", [(72, 192, 32), (72, 192, -1), (40, 100, -1)],
                         ids=["72x192-g32", "72x192-channel", "40x100-channel"])
def test_compressed_tensors_decompresses_our_layer_exactly(bits, sym, n, k, group_size):
    """N and K that are not multiples of 32: the dense packing cuts the last run of codes short."""
    scheme = LayerQuant(bits, group_size, sym)
    packed, p = _layer(n, k, scheme, False)
    tensors = to_ct_tensors(packed.qweight, packed.scales, packed.zeros, p, scheme=scheme, in_features=k)
    weights = {"num_bits": bits, "type": "int", "symmetric": sym, "dynamic": False,
               "strategy": "channel" if group_size == -1 else "group",
               "group_size": None if group_size == -1 else group_size, "actorder": None}
    theirs = PackedQuantizationCompressor.decompress(dict(tensors), QuantizationScheme(targets=["Linear"],
                                                                                       weights=weights))["weight"]
    ours = _ours_in_input_order(packed, p)
    assert theirs.shape == (n, k)
    # they multiply in the scale's dtype (fp16): the same product, rounded once to fp16
    torch.testing.assert_close(theirs.float(), ours.to(torch.float16).float(), rtol=0, atol=0)


def test_ragged_groups_and_perm_are_refused_by_name():
    scheme = LayerQuant(4, 64, True)
    packed, _ = _layer(32, 96, scheme, False)
    with pytest.raises(ExportError, match="model.x: K=96 is not a multiple of group_size=64"):
        to_ct_tensors(packed.qweight, packed.scales, None, None, scheme=scheme, in_features=96, name="model.x")
    packed, perm = _layer(32, 128, scheme, True)
    with pytest.raises(ExportError, match="model.y: act-order with perm .* static_groups=True"):
        to_ct_tensors(packed.qweight, packed.scales, None, perm, scheme=scheme, in_features=128, name="model.y")


IDS = torch.tensor([[1, 345, 2001, 77, 9000, 12, 4242, 31337]])
MIXED = QuantConfig(bits=4, group_size=32, overrides={
    "*.down_proj": {"bits": 8, "group_size": -1},
    "model.layers.1.self_attn.o_proj": {"bits": 3, "group_size": 64},
    "model.layers.0.mlp.gate_proj": "skip", "model.layers.0.mlp.up_proj": "skip",
})


@pytest.mark.parametrize("config", [MIXED, QuantConfig(bits=4, group_size=64)], ids=["mixed", "int4-g64"])
def test_transformers_loads_the_export_natively(tmp_path, tokenizer, config):
    """transformers' compressed-tensors method (no import llmquant needed) gives our model's logits.
    Symmetric schemes only: transformers 5.23 with compressed-tensors 0.20 cannot load asymmetric
    pack-quantized checkpoints from anyone (their zero points are packed; llm-compressor#1618). The
    asymmetric layout is checked against compressed-tensors' decompressor above and in vLLM (tier)."""
    from transformers import AutoModelForCausalLM

    model = build_tiny_llama(hidden=128, inter=256)
    llmquant.quantize(model, config, progress=False)
    with torch.no_grad():
        ref = model(IDS).logits
    src = llmquant.save_quantized(model, tmp_path / "q", tokenizer)
    out = export_compressed_tensors_checkpoint(src, tmp_path / "ct")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert "lm_head" in qc["ignore"] and ("model.layers.0.mlp.gate_proj" in qc["ignore"]) == (config is MIXED)
    schemes = {(g["weights"]["num_bits"], g["weights"]["group_size"], g["weights"]["symmetric"])
               for g in qc["config_groups"].values()}
    assert schemes == ({(4, 32, True), (8, None, True), (3, 64, True)} if config is MIXED else {(4, 64, True)})
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        got = back(IDS).logits
    # the float tensors went through fp32 either way; the dequantized weights through fp16 products
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3)
    assert int((got.argmax(-1) == ref.argmax(-1)).sum()) == IDS.numel()


def test_export_refuses_what_is_not_quantized(tmp_path):
    from llmquant.export.common import read_checkpoint

    model = build_tiny_llama()
    path = tmp_path / "float"
    model.save_pretrained(path)
    with pytest.raises(ExportError, match="no quantization_config"):
        read_checkpoint(path)
