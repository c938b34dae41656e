"""Sequential GPTQ on tiny random models of several families (seconds each)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from llmquant.config import QuantConfig
from llmquant.modules.quant_linear import QuantLinear
from llmquant.quantizers import gptq_model
from llmquant.quantizers.blocks import (
    BlockRunner,
    UnsupportedModelError,
    capture,
    find_layer_stack,
    make_chunks,
    probe_block,
    sequential_stages,
)
from llmquant.quantizers.gptq_model import quantize_gptq
from llmquant import quantize
from llmquant.modules.walk import find_linear_layers

from .tiny_models import FAMILIES, tiny_calibration, tiny_model

CONFIG = QuantConfig(bits=4, group_size=32, method="gptq")
# block-relative names of the linear layers GPTQ must replace in each family
EXPECTED = {
    "llama": 7, "qwen2": 7, "mistral": 7, "gemma3": 7,
    "gpt2": 4,  # c_attn, c_proj, c_fc, c_proj (Conv1D)
    "opt": 6,  # q, k, v, out_proj, fc1, fc2
}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def logits_error(model, ref_logits, ids) -> float:
    out = model(ids).logits
    return float(((out - ref_logits) ** 2).mean() / (ref_logits**2).mean())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_quantizes_and_beats_rtn(family):
    model = tiny_model(family)
    _, layers = find_layer_stack(model)
    calib = tiny_calibration()
    ids = torch.cat(calib)
    with torch.no_grad():
        ref = model(ids).logits
        rtn = copy.deepcopy(model)
        quantize(rtn, QuantConfig(bits=4, group_size=32), progress=False)
        e_rtn = logits_error(rtn, ref, ids)

        summary = quantize(model, CONFIG, calib, progress=False)
        e_gptq = logits_error(model, ref, ids)

    for block in layers:
        assert sum(isinstance(m, QuantLinear) for m in block.modules()) == EXPECTED[family]
        assert not any(isinstance(m, nn.Linear) for m in block.modules())
    assert not isinstance(model.get_output_embeddings(), QuantLinear)  # lm_head skipped by default
    assert summary["layers"] == 2 * EXPECTED[family]
    assert summary["calibration"] == {"sequences": 16, "tokens": 16 * 64}
    assert all(math.isfinite(m["rel_err"]) and m["rel_err"] < 0.05 for m in summary["modules"].values())
    assert [b["index"] for b in summary["blocks"]] == [0, 1]
    # close to float, and closer than round-to-nearest
    assert e_gptq < 0.1, e_gptq
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)


def test_captured_arguments_reproduce_the_float_model():
    # Gemma3 gives sliding-window and full-attention blocks different masks and rotary embeddings:
    # running the blocks with the captured arguments must reproduce the model's own hidden states.
    model = tiny_model("gemma3")
    calib = tiny_calibration(n=4)
    stack_name, layers = find_layer_stack(model)
    assert stack_name == "model.layers"
    with torch.no_grad():
        chunks = make_chunks(calib, chunk_tokens=128, device=torch.device("cpu"))
        assert [c.ids.shape for c in chunks] == [(2, 64), (2, 64)]
        cap = capture(model, layers, chunks)
        ids = torch.cat(calib)
        hs = model(ids, output_hidden_states=True).hidden_states
        x = torch.cat(cap.inputs)
        for i, layer in enumerate(layers):
            torch.testing.assert_close(x, hs[i], rtol=1e-5, atol=1e-5)
            runner = BlockRunner(layer, cap.calls_of(i), chunks)
            x = torch.cat([runner.run(xc, j) for j, xc in enumerate(x.split(2))])
        torch.testing.assert_close(model.model.norm(x), hs[-1], rtol=1e-5, atol=1e-5)
    # the forward is restored
    assert "forward" not in layers[0].__dict__


def test_act_order_and_non_sequential_paths():
    calib = tiny_calibration()
    ids = torch.cat(calib)
    for cfg in (
        CONFIG.replace(act_order=True),
        CONFIG.replace(act_order=True, static_groups=True),
        CONFIG.replace(true_sequential=False, group_size=-1, sym=False),
    ):
        model = tiny_model("qwen2")
        with torch.no_grad():
            ref = model(ids).logits
            quantize(model, cfg, calib, progress=False)
            assert logits_error(model, ref, ids) < 0.1
        q = model.model.layers[0].self_attn.q_proj
        assert isinstance(q, QuantLinear)
        assert (q.perm is not None) == (cfg.act_order and not cfg.static_groups)
        assert q.sym == cfg.sym and q.group_size == cfg.group_size


def test_skip_and_overrides_are_honoured():
    model = tiny_model("llama")
    cfg = CONFIG.replace(skip=("lm_head", "*.o_proj"), overrides={"re:.*\\.1\\.mlp\\.down_proj": {"bits": 8}})
    summary = quantize(model, cfg, tiny_calibration(), progress=False)
    for block in model.model.layers:
        assert isinstance(block.self_attn.o_proj, nn.Linear)
        assert isinstance(block.self_attn.q_proj, QuantLinear)
    assert model.model.layers[0].mlp.down_proj.bits == 4
    assert model.model.layers[1].mlp.down_proj.bits == 8
    assert summary["modules"]["model.layers.1.mlp.down_proj"]["bits"] == 8
    assert summary["layers"] == 12


def test_quantize_lm_head_unties_and_quantizes():
    model = tiny_model("gemma3")  # ties lm_head to the embedding
    assert model.lm_head.weight is model.model.embed_tokens.weight
    calib = tiny_calibration()
    ids = torch.cat(calib)
    with torch.no_grad():
        ref = model(ids).logits
        summary = quantize(model, CONFIG.replace(quantize_lm_head=True), calib, progress=False)
        err = logits_error(model, ref, ids)
    assert isinstance(model.lm_head, QuantLinear)
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    assert model.config.tie_word_embeddings is False
    assert "lm_head" in summary["modules"]
    assert summary["stages"]["lm_head"] > 0
    assert err < 0.1, err


def test_generic_stage_order_for_unknown_block():
    # a block whose layer names are in no family table: stages are "layers that read the same tensor",
    # in order of first call
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(16)
            self.wb = nn.Linear(16, 16)
            self.wa = nn.Linear(16, 16)
            self.wout = nn.Linear(16, 16)
            self.up = nn.Linear(16, 32)
            self.down = nn.Linear(32, 16)

        def forward(self, x):
            h = self.norm(x)
            x = x + self.wout(torch.tanh(self.wa(h)) * self.wb(h))
            return x + self.down(torch.relu(self.up(x)))

    block = Block()
    linears = dict(find_linear_layers(block))
    runner = BlockRunner(block, {(2, 5): ((), {})}, [make_chunks([torch.zeros(2, 5, dtype=torch.long)], 10, "cpu")[0]])
    probe = probe_block(runner, linears, torch.randn(2, 5, 16))
    assert sequential_stages(linears, probe, true_sequential=True) == [["wa", "wb"], ["wout"], ["up"], ["down"]]
    assert sequential_stages(linears, probe, true_sequential=False) == [["wa", "wb", "wout", "up", "down"]]


def test_hessian_pass_shares_inputs_and_stops_early():
    model = tiny_model("llama")
    calib = tiny_calibration(n=4)
    _, layers = find_layer_stack(model)
    block = layers[0]
    linears = dict(find_linear_layers(block))
    ran = []
    block.mlp.down_proj.register_forward_hook(lambda *a: ran.append("down"))
    block.self_attn.o_proj.register_forward_hook(lambda *a: ran.append("o"))
    with torch.no_grad():
        chunks = make_chunks(calib, chunk_tokens=128, device=torch.device("cpu"))
        cap = capture(model, layers, chunks)
        runner = BlockRunner(block, cap.calls_of(0), chunks)
        probe = probe_block(runner, linears, cap.inputs[0])
        ran.clear()
        qkv = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
        g = gptq_model._hessian_pass(runner, qkv, linears, probe, "model.layers.0", cap.inputs)
        assert ran == []  # stopped at q_proj: nothing after it ran
        assert g[qkv[1]].H is g[qkv[0]].H and g[qkv[2]].H is g[qkv[0]].H
        assert g[qkv[0]].nsamples == 4 * 64
        g = gptq_model._hessian_pass(runner, ["self_attn.o_proj"], linears, probe, "model.layers.0", cap.inputs)
        assert ran == []  # stopped at o_proj's input
        g = gptq_model._hessian_pass(runner, ["mlp.down_proj"], linears, probe, "model.layers.0", cap.inputs)
        assert ran == ["o", "o"]  # one forward per chunk up to down_proj's input


class _Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.calls = 0

    def forward(self, x, scale=1.0):
        self.calls += 1
        return self.proj(x) * scale


class _TwoPart(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _Counting()
        self.mlp = nn.Linear(16, 16)

    def forward(self, x):
        a = self.attn(x, scale=0.5)
        a += x  # in place on the child's output: a replay must hand out a fresh copy
        return self.mlp(a)


def test_frozen_child_is_replayed_only_for_identical_inputs():
    torch.manual_seed(0)
    block = _TwoPart()
    chunks = make_chunks([torch.zeros(2, 5, dtype=torch.long)] * 2, 10, "cpu")
    runner = BlockRunner(block, {(2, 5): ((), {})}, chunks)
    xs = [torch.randn(2, 5, 16), torch.randn(2, 5, 16)]
    with torch.no_grad():
        ref = [runner.run(x, j) for j, x in enumerate(xs)]
        runner.freeze("attn")
        assert [torch.equal(runner.run(x, j), r) for j, (x, r) in enumerate(zip(xs, ref))] == [True, True]
        assert block.attn.calls == 4  # recorded
        again = [runner.run(x, j) for j, x in enumerate(xs)]
        assert block.attn.calls == 4  # replayed
        assert all(torch.equal(a, r) for a, r in zip(again, ref))
        # a different input on chunk 0 is recomputed, never answered from the record
        other = runner.run(xs[1], 0)
        assert block.attn.calls == 5
        assert torch.equal(other, ref[1])
        runner.close()
    assert "forward" not in block.attn.__dict__


@pytest.mark.parametrize("family", ["gemma3", "gpt2"])
def test_replay_changes_nothing(family, monkeypatch):
    calib = tiny_calibration(n=8)
    replayed = tiny_model(family)
    quantize_gptq(replayed, CONFIG, calib, progress=False)
    monkeypatch.setattr(gptq_model, "settled_children", lambda *a: [])
    recomputed = tiny_model(family)
    quantize_gptq(recomputed, CONFIG, calib, progress=False)
    qa = {n: m for n, m in replayed.named_modules() if isinstance(m, QuantLinear)}
    qb = {n: m for n, m in recomputed.named_modules() if isinstance(m, QuantLinear)}
    assert qa.keys() == qb.keys() and len(qa) > 0
    for n in qa:
        assert torch.equal(qa[n].packed_qweight(), qb[n].packed_qweight()), n
        assert torch.equal(qa[n].scales, qb[n].scales), n


class _NoStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.proj = nn.Linear(8, 10)

    def forward(self, input_ids, **kwargs):
        return self.proj(self.embed(input_ids))


def test_unsupported_architecture_raises_clear_error():
    with pytest.raises(UnsupportedModelError, match="no stack of decoder layers in _NoStack"):
        quantize_gptq(_NoStack(), CONFIG, tiny_calibration(n=2), progress=False)


def test_lm_head_without_final_norm_fails_before_the_long_part(monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setattr(gptq_model, "FINAL_NORM_NAMES", ("no_such_norm",))
    with pytest.raises(UnsupportedModelError, match="no final norm found on model"):
        quantize_gptq(model, CONFIG.replace(quantize_lm_head=True), tiny_calibration(n=2), progress=False)
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)  # nothing was quantized


def test_bad_calibration_is_rejected():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="token ids"):
        quantize_gptq(model, CONFIG, [torch.randn(1, 8)], progress=False)
    with pytest.raises(ValueError, match="empty"):
        quantize_gptq(model, CONFIG, [], progress=False)


def test_float_targets_see_the_float_model_and_lower_the_error(monkeypatch):
    model = tiny_model("llama")
    calib = tiny_calibration()
    ids = torch.cat(calib)
    float_model = copy.deepcopy(model)
    # what the float model gives block 1's q_proj and the output layer's norm input, chunk by chunk
    want = {}
    layer1 = float_model.model.layers[1]
    hook = layer1.self_attn.q_proj.register_forward_pre_hook(lambda m, a: want.setdefault("q", a[0].clone()))
    with torch.no_grad():
        ref = float_model(ids).logits
    hook.remove()

    seen = {}
    add = gptq_model.GPTQ.add_batch

    def spy(self, inp, out=None, *, float_inp=None):
        if self.name.endswith("layers.1.self_attn.q_proj"):
            seen.setdefault("plain" if float_inp is None else "q", (inp.clone(), float_inp))
        return add(self, inp, out, float_inp=float_inp)

    monkeypatch.setattr(gptq_model.GPTQ, "add_batch", spy)
    cfg = QuantConfig(bits=3, group_size=32, method="gptq", quantize_lm_head=True)
    with torch.no_grad():
        plain = copy.deepcopy(model)
        quantize(plain, cfg, calib, progress=False)
        assert "q" not in seen and "plain" in seen  # plain GPTQ gives no float inputs
        summary = quantize(model, cfg.replace(float_targets=True), calib, progress=False)
        inp, float_inp = seen["q"]
        # the float stream is the float model's, token for token (one chunk holds all 16 sequences)
        torch.testing.assert_close(float_inp, want["q"], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(inp, float_inp)  # block 0 is quantized by then
        e_plain, e_target = logits_error(plain, ref, ids), logits_error(model, ref, ids)
    assert all("target_shift" in m for m in summary["modules"].values())
    assert e_target < 0.9 * e_plain, (e_target, e_plain)
    assert summary["quantization_config"]["float_targets"] is True
    assert "float_targets" not in QuantConfig(method="gptq").to_dict()  # older configs stay as they were
