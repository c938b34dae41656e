"""Quantized input embeddings (QuantConfig.quantize_embedding) and the output layer that shares them.

Exactness: a model with a quantized embedding computes what the float model computes with its table
replaced by the dequantized one (1e-5), for Llama (untied), Gemma 3 (scaled, tied) and GPT-2 (tied);
a checkpoint reloads to the same logits; a tied head quantized alike stores no tensor of its own.
"""
import copy

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import llmquant
from llmquant import CheckpointError, QuantConfig, QuantConfigError
from llmquant.formats.packing import dequantize_packed
from llmquant.modules.quant_embedding import QuantEmbedding, TiedQuantHead
from llmquant.modules.quant_linear import QuantLinear

from ..quantizers.tiny_models import VOCAB, tiny_calibration, tiny_model

IDS = torch.tensor([[1, 45, 200, 77, 9, 12, 42, 255], [3, 3, 100, 0, 1, 2, 250, 17]])


def dequantized_table(emb: QuantEmbedding) -> torch.Tensor:
    return dequantize_packed(emb.qweight, emb.scales, emb.zeros, bits=emb.bits, group_size=emb.group_size,
                             in_features=emb.embedding_dim)


def tied(model) -> bool:
    return bool(model.config.tie_word_embeddings)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("head", [True, False], ids=["head-quantized", "head-float"])
def test_quantized_embedding_is_exact_and_reloads(tmp_path, family, head):
    model = tiny_model(family)
    ref = copy.deepcopy(model)
    was_tied = tied(model)
    config = QuantConfig(bits=4, group_size=32, sym=False, quantize_lm_head=head, quantize_embedding=True)
    if was_tied and not head:  # a float head would keep the float table: stored twice, refused, nothing changed
        with pytest.raises(ValueError, match="store the table twice and grow by about"):
            llmquant.quantize(model, config, progress=False)
        assert not isinstance(model.get_input_embeddings(), QuantEmbedding) and tied(model)
        assert model.lm_head.weight is model.get_input_embeddings().weight
        assert not any(isinstance(m, QuantLinear) for m in model.modules())
        return
    llmquant.quantize(model, config, progress=False)
    emb = model.get_input_embeddings()
    assert isinstance(emb, QuantEmbedding)
    shares = head and was_tied
    assert isinstance(model.lm_head, TiedQuantHead if shares else (QuantLinear if head else torch.nn.Linear))
    assert tied(model) == shares
    # the same config without the embedding (RTN is deterministic, row by row), then the float table
    # replaced by the dequantized one
    llmquant.quantize(ref, config.replace(quantize_embedding=False), progress=False)
    with torch.no_grad():
        ref.get_input_embeddings().weight.copy_(dequantized_table(emb))
        torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)
        logits = model(IDS).logits
    path = llmquant.save_quantized(model, tmp_path / "q")
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    name = "transformer.wte" if family == "gpt2" else "model.embed_tokens"
    assert {f"{name}.qweight", f"{name}.scales", f"{name}.zeros"} <= keys and f"{name}.weight" not in keys
    assert not any(k.startswith("lm_head.") for k in keys) if shares else any(k.startswith("lm_head.") for k in keys)
    back = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert isinstance(back.get_input_embeddings(), QuantEmbedding)
    assert type(back.lm_head) is type(model.lm_head)
    if shares:
        assert back.lm_head.embedding is back.get_input_embeddings()
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, logits, rtol=1e-5, atol=1e-5)


def test_shared_table_is_stored_once_and_smaller(tmp_path):
    model = tiny_model("gemma3")
    assert tied(model)
    plain = copy.deepcopy(model)
    llmquant.quantize(plain, QuantConfig(bits=4, group_size=32), progress=False)
    both = copy.deepcopy(model)
    llmquant.quantize(both, QuantConfig(bits=4, group_size=32, quantize_lm_head=True, quantize_embedding=True),
                      progress=False)
    a = llmquant.save_quantized(plain, tmp_path / "plain") / "model.safetensors"
    b = llmquant.save_quantized(both, tmp_path / "both") / "model.safetensors"
    v, d = model.config.vocab_size, model.config.hidden_size
    elem = model.get_input_embeddings().weight.element_size()  # the table's storage dtype (here fp32)
    saved = a.stat().st_size - b.stat().st_size
    # the float table, stored once (tied), became 4-bit codes + an fp16 scale per 32 (0.5625 bytes a weight)
    assert saved == pytest.approx(v * d * (elem - 0.5625), rel=0.01)


def test_gptq_with_quantized_embedding_and_bf16(tmp_path):
    """GPTQ quantizes a shared table as the head; the model runs in bf16 after a cast."""
    model = tiny_model("gemma3")
    config = QuantConfig(bits=4, group_size=32, method="gptq", quantize_lm_head=True, quantize_embedding=True)
    ref = copy.deepcopy(model)
    summary = llmquant.quantize(model, config, calibration=tiny_calibration(), progress=False)
    assert isinstance(model.lm_head, TiedQuantHead)
    # the shared table was quantized by GPTQ as the head (its Hessian), with act-order but no stored perm
    assert summary["modules"]["lm_head"]["bits"] == 4 and model.get_input_embeddings().perm is None
    llmquant.quantize(ref, config.replace(method="rtn", act_order=None, clip_search=None), progress=False)
    assert not torch.equal(ref.get_input_embeddings().qweight, model.get_input_embeddings().qweight)
    model.to(torch.bfloat16)
    emb = model.get_input_embeddings()
    assert emb.compute_dtype == torch.bfloat16 and emb.scales.dtype == torch.float16
    with torch.no_grad():
        out = model(IDS).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    x = emb(IDS)
    assert x.dtype == torch.bfloat16
    expect = (dequantized_table(emb)[IDS].to(torch.bfloat16) * torch.tensor(emb.embed_scale).to(torch.bfloat16))
    assert torch.equal(x, expect)


def test_embedding_overrides_and_bad_input():
    model = tiny_model("llama")
    config = QuantConfig(bits=4, group_size=32, quantize_embedding=True, overrides={"embed_tokens": {"bits": 8}})
    llmquant.quantize(model, config, progress=False)
    emb = model.get_input_embeddings()
    assert emb.bits == 8 and emb.group_size == 32
    with pytest.raises(IndexError, match=f"id {VOCAB} out of range for a vocabulary of {VOCAB}"):
        emb(torch.tensor([[0, VOCAB]]))
    with pytest.raises(TypeError, match="integer"):
        emb(torch.zeros(1, 2))
    with pytest.raises(QuantConfigError, match="quantize_embedding must be a bool"):
        QuantConfig(quantize_embedding="yes")
    # NaN in the table: refused, nothing changed
    model = tiny_model("llama")
    with torch.no_grad():
        model.get_input_embeddings().weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        llmquant.quantize(model, QuantConfig(quantize_embedding=True), progress=False)
    assert type(model.get_input_embeddings()) is torch.nn.Embedding
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_checkpoint_with_float_embedding_weight_is_refused(tmp_path):
    """A checkpoint whose config says the embedding is quantized but that stores a float table."""
    from safetensors.torch import load_file, save_file

    model = tiny_model("llama")
    llmquant.quantize(model, QuantConfig(bits=4, group_size=32, quantize_embedding=True), progress=False)
    path = llmquant.save_quantized(model, tmp_path / "q")
    st = path / "model.safetensors"
    tensors = load_file(st)
    del tensors["model.embed_tokens.qweight"]
    tensors["model.embed_tokens.weight"] = torch.zeros(VOCAB, model.config.hidden_size, dtype=torch.float16)
    save_file(tensors, st, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.embed_tokens.qweight: missing from the checkpoint"):
        AutoModelForCausalLM.from_pretrained(path)


def test_size_budget_counts_the_quantized_table(tmp_path):
    """max_size is the whole checkpoint: with quantize_embedding the allocation prices the table (stored once
    with the tied head), and the saved tensors fit the budget."""
    from llmquant.checkpoint import storage_dtype
    from llmquant.mixed.measure import _other_bytes, header_bytes, other_bytes
    from llmquant.quantizers.plan import plan

    model = tiny_model("gemma3")
    config = QuantConfig(method="gptq", quantize_lm_head=True, quantize_embedding=True, group_size=32,
                         mixed_group_sizes=(32,), max_size=60_000)
    planned = {n for n, _, _ in plan(model, config)}
    assert "lm_head" not in planned  # the tied head shares the table: not a layer of its own
    v, d = model.config.vocab_size, model.config.hidden_size
    elem = torch.empty((), dtype=storage_dtype(model)).element_size()
    float_other = _other_bytes(model, planned, storage_dtype(model)) + header_bytes(model, config, planned)
    # the table is allocated: outside the layers only the rest remains (under a latency budget it keeps its
    # fixed scheme and is counted at that size)
    assert other_bytes(model, config, planned, storage_dtype(model)) == float_other - v * d * elem
    fixed = config.replace(max_size=None, max_latency=1.0, quantize_lm_head=False)  # + the untied float head
    assert other_bytes(model, fixed, planned, storage_dtype(model)) == float_other + v * d // 2 + v * 2 * d // 32
    with pytest.raises(QuantConfigError, match="latency budget does not price a head that shares"):
        config.replace(max_size=None, max_latency=1.0)
    llmquant.quantize(model, config, calibration=tiny_calibration(), progress=False)
    assert isinstance(model.lm_head, TiedQuantHead)
    path = llmquant.save_quantized(model, tmp_path / "q")
    assert (path / "model.safetensors").stat().st_size <= 60_000  # the file, header included


def test_the_allocation_prices_the_table(tmp_path):
    """With quantize_embedding, a bit budget chooses the embedding table's scheme too: the measurement has
    the table as one more group (its lookups' error and the shared head's), the tied head keeps sharing
    it, and the bits per weight reached count the table once."""
    from llmquant.mixed import plan_mixed
    from llmquant.mixed.measure import Measurement, MeasurementError

    model = tiny_model("gemma3")
    config = QuantConfig(method="gptq", quantize_lm_head=True, quantize_embedding=True, target_bpw=4.0,
                         mixed_group_sizes=(32, 64))
    calib = tiny_calibration()
    path = tmp_path / "meas.json"
    effective, summary = plan_mixed(copy.deepcopy(model), config, calib, progress=False, measurement=path)
    meas = Measurement.load(path)
    table = meas.layer("model.embed_tokens")
    assert (table.n, table.k) == (model.config.vocab_size, model.config.hidden_size)
    assert "lm_head" not in [lay.name for lay in meas.layers]  # shared: priced with the table, stored once
    group = next(g for g in meas.groups if g.name == "model.embed_tokens")
    assert group.layers == ["model.embed_tokens"] and group.probe_kl > 0 and group.sensitivity > 0
    errs = [table.errors[k] for k in ("4g32s", "3g32s", "2g32s")]
    assert errs[0] < errs[1] < errs[2]
    emb = effective.resolve("model.embed_tokens")
    assert effective.resolve("lm_head") == emb and summary["allocation"]["bpw"] <= 4.0
    llmquant.quantize(model, effective, calibration=calib, progress=False)
    assert isinstance(model.lm_head, TiedQuantHead) and model.get_input_embeddings().bits == emb.bits
    # a measurement made without the table does not fit a config that quantizes it
    plain = tmp_path / "plain.json"
    plan_mixed(tiny_model("gemma3"), config.replace(quantize_embedding=False, quantize_lm_head=False), calib,
               progress=False, measurement=plain)
    with pytest.raises(MeasurementError):
        plan_mixed(tiny_model("gemma3"), config, calib, progress=False, measurement=plain)


def test_recover_keeps_the_table_frozen():
    """Quantization-aware training opens the linear layers only: the shared table stays a QuantEmbedding."""
    from llmquant.distill.trainable import close_after_training, open_for_training

    model = tiny_model("gemma3")
    llmquant.quantize(model, QuantConfig(bits=4, group_size=32, quantize_lm_head=True, quantize_embedding=True),
                      progress=False)
    emb = model.get_input_embeddings()
    n = open_for_training(model)
    assert n == sum(1 for m in model.modules() if type(m).__name__ == "TrainableQuantLinear") == 14
    assert model.get_input_embeddings() is emb and model.lm_head.embedding is emb
    assert close_after_training(model) == 14
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


def test_a_shared_head_takes_the_models_dynamic_int8_activations(tmp_path, monkeypatch):
    """activations="dynamic_int8" reaches the head that shares the table, as it reaches every other quantized
    layer: quantized here and reloaded (hidden 128: INT8 activations need a full 128-column superblock)."""
    cfg = transformers.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=16,
                                        layer_types=["full_attention"], max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    assert tied(model)
    config = QuantConfig(bits=4, group_size=-1, quantize_lm_head=True, quantize_embedding=True,
                         activations="dynamic_int8")
    llmquant.quantize(model, config, progress=False)
    assert isinstance(model.lm_head, TiedQuantHead) and model.lm_head.embedding.act_int8
    x = torch.randn(3, 128)
    with torch.no_grad():
        a8 = model.lm_head(x)
        monkeypatch.setenv("LLMQUANT_ACTIVATIONS", "float")
        fl = model.lm_head(x)
        monkeypatch.delenv("LLMQUANT_ACTIVATIONS")
    assert not torch.allclose(a8, fl, rtol=0, atol=1e-6)  # the INT8 path really ran
    assert (a8 - fl).abs().max() < 0.05 * fl.abs().max()
    back = AutoModelForCausalLM.from_pretrained(llmquant.save_quantized(model, tmp_path / "q"), dtype=torch.float32)
    assert isinstance(back.lm_head, TiedQuantHead) and back.lm_head.embedding.act_int8
    with torch.no_grad():
        torch.testing.assert_close(back.lm_head(x), a8, rtol=1e-5, atol=1e-5)
