"""quantize -> save -> from_pretrained -> same logits; quantize-on-load; bad checkpoints fail loudly."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import llmquant
from llmquant import CheckpointError, LlmQuantConfig, QuantConfig, QuantConfigError, QuantLinear
from llmquant.cli.commands import checkpoint_info

from ..conftest import build_tiny_llama
from ..quantizers.tiny_models import VOCAB, tiny_model

IDS = torch.tensor([[1, 345, 2001, 77, 9000, 12, 4242, 31337]])


def _quantized_ckpt(tmp_path, tokenizer, config, **build):
    model = build_tiny_llama(**build)
    llmquant.quantize(model, config, progress=False)
    with torch.no_grad():
        logits = model(IDS).logits
    path = tmp_path / "q"
    llmquant.save_quantized(model, path, tokenizer, dtype=None)
    return path, logits


@pytest.mark.parametrize(
    "config",
    [
        QuantConfig(bits=4, group_size=64),  # K=96 for q/k/v/o/gate/up: ragged last group
        QuantConfig(bits=3, group_size=32, sym=False),
        QuantConfig(bits=8, group_size=-1, quantize_lm_head=True),  # tied head is untied and quantized
        QuantConfig(bits=2, group_size=128, overrides={"down_proj": {"bits": 8}, "q_proj": "skip"}),
        # compact scales and zero points; 3-bit zero points of 3 groups (96 / 32) fill 9 bits of 2 bytes
        QuantConfig(bits=3, group_size=32, sym=False, compact_qparams=True),
        QuantConfig(bits=4, group_size=64, compact_qparams=True, overrides={"down_proj": {"bits": 8, "sym": False}}),
    ],
    ids=["int4-g64-ragged", "int3-asym", "int8-head", "mixed", "compact-int3-asym", "compact-mixed"],
)
def test_save_reload_identical_logits(tmp_path, tokenizer, config):
    path, logits = _quantized_ckpt(tmp_path, tokenizer, config, hidden=96, inter=160, bias=True)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["quantization_config"] == config.to_dict()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    expected = {n for n, m in build_tiny_llama(hidden=96, inter=160).named_modules()
                if isinstance(m, torch.nn.Linear) and config.resolve(n) is not None}
    assert quantized == expected
    for name in quantized:
        assert model.get_submodule(name).scheme == config.resolve(name)
    with torch.no_grad():
        again = model(IDS).logits
    torch.testing.assert_close(again, logits, rtol=1e-5, atol=1e-5)


def test_footprint_int4_g128(tmp_path, tokenizer):
    path, _ = _quantized_ckpt(tmp_path, tokenizer, QuantConfig(bits=4, group_size=128), hidden=256, inter=512)
    info = checkpoint_info(path)
    ratio = info["linear_bytes"] / info["linear_fp16_bytes_approx"]
    assert ratio <= 0.3, ratio
    assert all(lay["K_max"] in (256, 512) for lay in info["layers"])


def test_quantize_while_loading_matches_in_memory(float_ckpt):
    cfg = LlmQuantConfig(bits=4, group_size=32, sym=False)
    model = AutoModelForCausalLM.from_pretrained(float_ckpt, dtype=torch.float32, quantization_config=cfg)
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    ref = AutoModelForCausalLM.from_pretrained(float_ckpt, dtype=torch.float32)
    llmquant.quantize(ref, cfg.quant, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)
    # and what it saves loads back the same
    out = float_ckpt.parent / "onload"
    model.save_pretrained(out)
    again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head", [False, True], ids=["tied-head", "int8-head"])
def test_gpt2_conv1d_checkpoint_reloads(tmp_path, head):
    """GPT-2's Conv1D layers (c_attn, c_proj, c_fc) load as QuantLinear. After loading, transformers
    initializes what the checkpoint lacks, and GPT2PreTrainedModel._init_weights rescales each block's
    ``c_proj.weight`` by name: loading used to fail with "'QuantLinear' object has no attribute 'weight'".
    The layers stay quantized (no float weight, not even the loading-time stand-in)."""
    config = QuantConfig(bits=8, group_size=-1, quantize_lm_head=True) if head else QuantConfig(bits=4, group_size=32)
    model = tiny_model("gpt2")
    llmquant.quantize(model, config, progress=False)
    ids = IDS % VOCAB
    with torch.no_grad():
        logits = model(ids).logits
    llmquant.save_quantized(model, tmp_path / "q")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    layers = {n: m for n, m in back.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 4 * 2 + head, sorted(layers)
    assert not any(hasattr(m, "weight") for m in layers.values())
    assert "initialize_weights" not in back.__dict__  # the loading-time wrapper is gone
    if not head:
        assert back.lm_head.weight is back.transformer.wte.weight
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, logits, rtol=1e-5, atol=1e-5)


# --- bad checkpoints ---------------------------------------------------------------------------
LAYER = "model.layers.1.mlp.down_proj"


def _edit_tensors(path, fn):
    f = path / "model.safetensors"
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def _edit_config(path, fn):
    f = path / "config.json"
    cfg = json.loads(f.read_text())
    fn(cfg["quantization_config"])
    f.write_text(json.dumps(cfg))


def _nan_scales(t):
    t[f"{LAYER}.scales"][0, 0] = float("nan")


def _bad_zero(t):
    t[f"{LAYER}.zeros"][3, 0] = 99


CASES = {
    "missing": (lambda p: _edit_tensors(p, lambda t: t.pop(f"{LAYER}.scales")), rf"{LAYER}\.scales: missing"),
    "wrong-shape": (lambda p: _edit_tensors(p, lambda t: t.update({f"{LAYER}.qweight": t[f"{LAYER}.qweight"][:, :-1].contiguous()})),
                    rf"{LAYER}\.qweight: shape"),
    "wrong-dtype": (lambda p: _edit_tensors(p, lambda t: t.update({f"{LAYER}.scales": t[f"{LAYER}.scales"].float()})),
                    rf"{LAYER}\.scales: dtype F32"),
    "nan-scales": (lambda p: _edit_tensors(p, _nan_scales), rf"{LAYER}\.scales: 1 non-finite"),
    "zero-out-of-range": (lambda p: _edit_tensors(p, _bad_zero), rf"{LAYER}\.zeros: value 99 out of range"),
    "float-weight-instead": (lambda p: _edit_tensors(p, lambda t: t.update({f"{LAYER}.weight": torch.zeros(96, 160)})),
                             rf"{LAYER}\.weight: a float weight"),
    "truncated": (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:-1000]),
                  "truncated"),
    "unknown-bits": (lambda p: _edit_config(p, lambda q: q.update(bits=5)), "bits must be one of"),
    "unknown-version": (lambda p: _edit_config(p, lambda q: q.update(format_version=9)), "unsupported format_version 9"),
    "unknown-field": (lambda p: _edit_config(p, lambda q: q.update(bogus=1)), "unknown fields"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint_raises(tmp_path, tokenizer, case):
    path, _ = _quantized_ckpt(tmp_path, tokenizer, QuantConfig(bits=4, group_size=32, sym=False), hidden=96, inter=160)
    corrupt, msg = CASES[case]
    corrupt(path)
    with pytest.raises((CheckpointError, ValueError), match=msg):
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_save_refuses_nonempty_and_unquantized(tmp_path, tokenizer):
    model = build_tiny_llama()
    with pytest.raises(ValueError, match="no quantization_config"):
        llmquant.save_quantized(model, tmp_path / "x")
    llmquant.quantize(model, QuantConfig(), progress=False)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        llmquant.save_quantized(model, tmp_path / "x")
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


# --- what a checkpoint weighs, and who may read it --------------------------------------------------
def _fp16_source(tmp_path):
    """A tiny tied Llama saved in fp16, as the built-in models are (small vocabulary: the linear layers,
    not the embedding, hold most of the bytes)."""
    model = build_tiny_llama(vocab_size=1024, hidden=256, inter=512).half()
    path = tmp_path / "fp16"
    model.save_pretrained(path)
    return path


def _tensor_dtypes(path):
    from llmquant.checkpoint import read_safetensors_header

    return {k: v["dtype"] for k, v in read_safetensors_header(path / "model.safetensors").items()}


@pytest.mark.parametrize("how", ["save_quantized", "save_pretrained", "quantize-on-load"])
def test_float_tensors_keep_the_source_dtype_and_ties(tmp_path, tokenizer, how):
    """An INT4 checkpoint used to be bigger than its fp16 source: the float tensors were written in the
    dtype the model ran in (fp32). They keep the source's dtype, and a tied embedding is stored once."""
    src = _fp16_source(tmp_path)
    ids = IDS % 1024
    out = tmp_path / "q"
    if how == "quantize-on-load":
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32,
                                                     quantization_config=LlmQuantConfig(bits=4, group_size=32))
    else:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)  # runs in fp32
        llmquant.quantize(model, QuantConfig(bits=4, group_size=32), progress=False)
    assert model.dtype == torch.float32
    with torch.no_grad():
        logits = model(ids).logits
    if how == "save_pretrained":
        model.save_pretrained(out)
    else:
        llmquant.save_quantized(model, out)
    dtypes = _tensor_dtypes(out)
    assert dtypes["model.embed_tokens.weight"] == "F16" and "lm_head.weight" not in dtypes
    assert dtypes["model.norm.weight"] == "F16"
    info = checkpoint_info(out)
    assert info["source_dtype"] == "float16"
    assert info["tensor_bytes"] < 0.75 * info["source_tensor_bytes"], info
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():  # the float tensors were fp16 to begin with: nothing is lost
        torch.testing.assert_close(back(ids).logits, logits, rtol=1e-5, atol=1e-5)
    # saved again, the record of the source travels on
    llmquant.save_quantized(back, tmp_path / "again")
    assert checkpoint_info(tmp_path / "again")["source_tensor_bytes"] == info["source_tensor_bytes"]


def test_dtype_can_be_chosen(tmp_path, tokenizer):
    path, _ = _quantized_ckpt(tmp_path, tokenizer, QuantConfig(bits=4, group_size=32), hidden=96, inter=160)
    assert _tensor_dtypes(path)["model.embed_tokens.weight"] == "F32"  # built in fp32, stored in fp32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    llmquant.save_quantized(model, tmp_path / "bf16", dtype=torch.bfloat16)
    assert _tensor_dtypes(tmp_path / "bf16")["model.embed_tokens.weight"] == "BF16"


def test_checkpoint_files_honour_the_umask(tmp_path, tokenizer):
    """safetensors creates files 0600; a server running as another user must be able to read the model."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        path, _ = _quantized_ckpt(tmp_path, tokenizer, QuantConfig(bits=4, group_size=32), hidden=96, inter=160)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    for f in path.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


# --- dynamic INT8 activations, chosen per model -------------------------------------------------------
def test_dynamic_int8_activations_travel_with_the_checkpoint(tmp_path, tokenizer, monkeypatch):
    """QuantConfig(activations="dynamic_int8"): every quantized layer runs the kernel's INT8 path (the
    reference kernel emulates it exactly), the checkpoint records the choice, and LLMQUANT_ACTIVATIONS
    overrides it at run time."""
    config = QuantConfig(bits=4, group_size=128, activations="dynamic_int8")
    path, logits = _quantized_ckpt(tmp_path, tokenizer, config, hidden=256, inter=512)
    assert json.loads((path / "config.json").read_text())["quantization_config"]["activations"] == "dynamic_int8"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert all(m.act_int8 for m in model.modules() if isinstance(m, QuantLinear))
    with torch.no_grad():
        a8 = model(IDS).logits
        torch.testing.assert_close(a8, logits, rtol=1e-5, atol=1e-5)
        monkeypatch.setenv("LLMQUANT_KERNEL", "reference")
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.invalidate_kernel()
        torch.testing.assert_close(model(IDS).logits, a8, rtol=1e-4, atol=1e-4 * a8.abs().max().item())
        monkeypatch.delenv("LLMQUANT_KERNEL")
        monkeypatch.setenv("LLMQUANT_ACTIVATIONS", "float")
        fl = model(IDS).logits
    assert not torch.allclose(fl, a8, rtol=0, atol=1e-6)
    assert (fl - a8).abs().max() < 0.05 * fl.abs().max()  # int8 activations: close, not equal
    monkeypatch.setenv("LLMQUANT_ACTIVATIONS", "int4")
    with pytest.raises(ValueError, match="LLMQUANT_ACTIVATIONS"):
        model(IDS)
    with pytest.raises(QuantConfigError, match="activations must be one of"):
        QuantConfig(activations="int4")
