"""Golden and behaviour tests of compact group parameters (``compact_qparams``; the "Compact group
parameters" section of llmquant/formats/packing.py's docstring)."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import llmquant
from llmquant import CheckpointError, QuantConfig, QuantLinear
from llmquant.config import LayerQuant
from llmquant.formats.packing import (
    LOG_SCALE_MAX,
    LOG_SCALE_TABLE,
    decode_scales,
    dequantize_packed,
    encode_scales,
    num_groups,
    pack_zeros,
    packed_zero_bytes,
    perm_dtype,
    snap_scales,
    unpack_zeros,
)
from llmquant.mixed.cost import layer_bytes
from llmquant.quantizers.rtn import quantize_weight_rtn

from ..conftest import build_tiny_llama
from ..hf.test_checkpoint_roundtrip import _edit_tensors

IDS = torch.tensor([[1, 345, 2001, 77, 9000, 12, 4242, 31337]])


def test_table_is_pinned():
    # float16 bit patterns of 2**(j/12), j = 0..11: a reader in any language decodes to these numbers
    bits = LOG_SCALE_TABLE.view(torch.int16).tolist()
    assert bits == [0x3C00, 0x3C3D, 0x3C7D, 0x3CC2, 0x3D0A, 0x3D57, 0x3DA8, 0x3DFE, 0x3E59, 0x3EBA, 0x3F21, 0x3F8D]


def test_decode_golden_values():
    c = torch.tensor([0, 1, 12, 13, 168, 255], dtype=torch.uint8)
    s = decode_scales(c)
    assert s.dtype == torch.float16
    assert s.tolist() == [2.0 ** -14, float(LOG_SCALE_TABLE[1]) * 2.0 ** -14, 2.0 ** -13,
                          float(LOG_SCALE_TABLE[1]) * 2.0 ** -13, 1.0, 152.25]
    assert LOG_SCALE_MAX == 152.25


def test_every_code_round_trips_and_off_grid_scales_are_refused():
    codes = torch.arange(256, dtype=torch.uint8)
    s = decode_scales(codes)
    assert torch.equal(encode_scales(s), codes)
    assert (s[1:].float() > s[:-1].float()).all()  # strictly increasing: one code per scale
    with pytest.raises(ValueError, match="not on the compact grid"):
        encode_scales(torch.tensor([0.0123], dtype=torch.float16))


def test_snap_goes_up_to_the_next_grid_point():
    s = torch.logspace(-4.2, 2.18, 5000, base=10.0)  # inside [2**-14, 152.25]
    rel = snap_scales(s) / s - 1
    assert float(rel.min()) >= -2.0 ** -11  # never below (to within float16 precision): no clipping
    assert float(rel.max()) <= 2 ** (1 / 12) - 1 + 1e-3  # at most one step of 2**(1/12) above
    grid = decode_scales(torch.arange(256, dtype=torch.uint8)).float()
    assert torch.equal(snap_scales(grid), grid)  # grid points stay
    # out of range: clamped to the ends
    assert snap_scales(torch.tensor([1e-9, 1e4])).tolist() == [2.0 ** -14, 152.25]


def test_zero_points_worked_example():
    z = torch.tensor([[1, 2, 3, 4, 5]], dtype=torch.uint8)
    packed = pack_zeros(z, 3)
    assert packed.tolist() == [[0xD1, 0x58]]
    assert packed_zero_bytes(5, 3) == 2
    assert torch.equal(unpack_zeros(packed, 3, 5), z)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), n=st.integers(1, 5), ng=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_zero_points_round_trip(bits, n, ng, seed):
    z = torch.randint(0, 1 << bits, (n, ng), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = pack_zeros(z, bits)
    assert packed.shape == (n, packed_zero_bytes(ng, bits))
    assert torch.equal(unpack_zeros(packed, bits, ng), z)


def test_zero_point_errors():
    with pytest.raises(ValueError, match="out of range for 2-bit"):
        pack_zeros(torch.tensor([[4]], dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="expected uint8"):
        unpack_zeros(torch.zeros(2, 3, dtype=torch.uint8), 3, 5)


@pytest.mark.parametrize("scheme", [LayerQuant(3, 32, False), LayerQuant(4, 128, True), LayerQuant(2, -1, False),
                                    LayerQuant(8, 64, False)], ids=str)
def test_compact_rtn_layer(scheme):
    """A compact layer stores what it computes with: its scales are grid points, its bytes are
    layer_bytes(compact=True), and its weights are as close to the float ones as float16 scales give."""
    g = torch.Generator().manual_seed(0)
    n, k = 48, 160
    w = torch.randn(n, k, generator=g) / k ** 0.5
    plain = quantize_weight_rtn(w, scheme, clip=True)
    pw = quantize_weight_rtn(w, scheme, clip=True, compact=True)
    mod = QuantLinear.from_packed(pw, None, compact=True)
    assert mod.scales.dtype == torch.uint8 and mod.scales.shape == (n, num_groups(k, scheme.group_size))
    back = mod.packed()
    assert torch.equal(back.scales, pw.scales) and torch.equal(back.qweight, pw.qweight)
    if not scheme.sym:
        assert mod.zeros.shape == (n, packed_zero_bytes(num_groups(k, scheme.group_size), scheme.bits))
        assert torch.equal(back.zeros, pw.zeros)
    assert mod.weight_bytes() == layer_bytes(n, k, scheme, perm=False, compact=True)
    assert mod.weight_bytes() < layer_bytes(n, k, scheme, perm=False)

    def err(p):
        d = dequantize_packed(p.qweight, p.scales, p.zeros, bits=p.bits, group_size=p.group_size, in_features=k) - w
        return float((d * d).sum())
    assert err(pw) <= 1.1 * err(plain)
    x = torch.randn(3, k, generator=g)
    wq = dequantize_packed(pw.qweight, pw.scales, pw.zeros, bits=pw.bits, group_size=pw.group_size, in_features=k)
    torch.testing.assert_close(mod(x), x @ wq.T, rtol=1e-5, atol=1e-5)
    # float16 scales that are not grid points cannot be stored compact without changing the layer
    with pytest.raises(ValueError, match="not on the compact grid"):
        QuantLinear.from_packed(plain, None, compact=True)


@pytest.fixture()
def compact_ckpt(tmp_path, tokenizer):
    model = build_tiny_llama(hidden=96, inter=160)
    calib = [torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    config = QuantConfig(bits=3, group_size=32, sym=False, method="gptq", compact_qparams=True)
    llmquant.quantize(model, config, calibration=calib, progress=False)
    with torch.no_grad():
        logits = model(IDS).logits
    path = tmp_path / "q"
    llmquant.save_quantized(model, path, tokenizer, dtype=None)
    return path, logits, model


def test_gptq_compact_checkpoint_stores_codes_and_reloads(compact_ckpt):
    path, logits, model = compact_ckpt
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert cfg["compact_qparams"] is True
    t = load_file(path / "model.safetensors")
    name = "model.layers.0.mlp.down_proj"
    assert t[f"{name}.scales"].dtype == torch.uint8 and t[f"{name}.scales"].shape == (96, 5)
    assert t[f"{name}.zeros"].dtype == torch.uint8 and t[f"{name}.zeros"].shape == (96, 2)  # 5 x 3 bits
    assert t[f"{name}.perm"].dtype == torch.int16 and t[f"{name}.perm"].shape == (160,)
    back = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert "compact_qparams" in repr(back.get_submodule(name))
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, logits, rtol=1e-5, atol=1e-5)


def test_compact_checkpoint_mismatches_are_named(compact_ckpt, tmp_path):
    path, _, _ = compact_ckpt
    name = "model.layers.1.mlp.down_proj"
    # float16 scales where the config says compact
    _edit_tensors(path, lambda t: t.update({f"{name}.scales": decode_scales(t[f"{name}.scales"])}))
    with pytest.raises((CheckpointError, ValueError), match=rf"{name}\.scales: dtype F16.*says compact_qparams"):
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    # and compact tensors under a config that does not say so
    f = path / "config.json"
    cfg = json.loads(f.read_text())
    del cfg["quantization_config"]["compact_qparams"]
    f.write_text(json.dumps(cfg))
    with pytest.raises((CheckpointError, ValueError), match=r"scales: dtype U8.*does not say compact_qparams"):
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_compact_perm_is_int16_up_to_32768_columns():
    assert perm_dtype(32768, True) == torch.int16 and perm_dtype(32769, True) == torch.int32
    assert perm_dtype(640, False) == torch.int32
    with torch.device("meta"):
        wide = QuantLinear(32769, 1, LayerQuant(4, 128, True), bias=False, has_perm=True, compact=True)
    assert wide.expected_tensors()["perm"] == ((32769,), torch.int32)


def test_compact_checkpoint_with_an_int32_perm_loads(compact_ckpt):
    """Compact checkpoints written before the int16 perm store it as int32: they load and compute alike;
    a perm of another dtype is refused by name."""
    path, logits, _ = compact_ckpt
    name = "model.layers.0.mlp.down_proj"
    _edit_tensors(path, lambda t: t.update({k: v.to(torch.int32) for k, v in t.items() if k.endswith(".perm")}))
    back = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert back.get_submodule(name).perm.dtype == torch.int32
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, logits, rtol=1e-5, atol=1e-5)
    _edit_tensors(path, lambda t: t.update({f"{name}.perm": t[f"{name}.perm"].to(torch.int64)}))
    with pytest.raises((CheckpointError, ValueError), match=rf"{name}\.perm: dtype"):
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_training_a_compact_model_is_refused(compact_ckpt):
    from llmquant.distill.trainable import open_for_training

    _, _, model = compact_ckpt
    with pytest.raises(ValueError, match="compact"):
        open_for_training(model)


def test_exporters_read_a_compact_checkpoint_as_plain_tensors(compact_ckpt):
    """The GPTQ and compressed-tensors exporters both read checkpoints through read_checkpoint, which
    decodes compact scales and zero points into the float16 / uint8 tensors their formats take."""
    from llmquant.export.common import read_checkpoint

    path, _, model = compact_ckpt
    ckpt = read_checkpoint(path)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        p = model.get_submodule(name).packed()
        assert ckpt.tensors[f"{name}.scales"].dtype == torch.float16
        assert torch.equal(ckpt.tensors[f"{name}.scales"], p.scales)
        assert torch.equal(ckpt.tensors[f"{name}.zeros"], p.zeros)


def test_config_writes_compact_qparams_only_when_on():
    assert "compact_qparams" not in QuantConfig(bits=4).to_dict()  # older checkpoints keep their config
    d = QuantConfig(bits=4, compact_qparams=True).to_dict()
    assert d["compact_qparams"] is True
    assert QuantConfig.from_dict(d).compact_qparams is True
    from llmquant.config import QuantConfigError

    with pytest.raises(QuantConfigError, match="compact_qparams must be a bool"):
        QuantConfig(bits=4, compact_qparams="yes")
