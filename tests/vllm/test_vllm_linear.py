"""Unit tier of the vLLM plugin: vLLM's own parallel linear layers with the llmquant method.

Each test builds vLLM layers (QKVParallelLinear, MergedColumnParallelLinear, RowParallelLinear,
ParallelLMHead) in a one-process group, feeds the checkpoint tensors of every part through the
layers' own ``weight_loader`` exactly as vLLM's model loader does, and compares the outputs with
``dequant_matmul_ref`` on the unfused parts. Tensor parallelism is exercised by building the layer
once per rank with vLLM's rank/size getters patched (every rank loads the full checkpoint tensors and
keeps its cut), then reassembling the ranks' outputs the way vLLM's collectives would.

Tolerance: fp32 activations of unit scale, ``assert_close(rtol=1e-5, atol=1e-5)`` against the
reference (whichever kernel the registry picks: the kernels sum in different orders).

Run with the venv from ``.ci/vllm-setup.sh``:
``/opt/llmquant-vllm-venv/bin/python -m pytest tests/vllm -m vllm``.
"""
from __future__ import annotations

import importlib.metadata
import socket

import pytest
import torch

try:
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import (
        destroy_distributed_environment,
        destroy_model_parallel,
    )
    from vllm.model_executor.layers import linear as vllm_linear
    from vllm.model_executor.layers.linear import (
        MergedColumnParallelLinear,
        QKVParallelLinear,
        RowParallelLinear,
        UnquantizedLinearMethod,
    )
    from vllm.model_executor.layers.quantization import (
        QUANTIZATION_METHODS,
        get_quantization_config,
    )
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
except ImportError as e:  # the base environment has no vLLM; .ci/vllm-setup.sh makes a venv that does
    pytest.skip(f"vLLM is not importable ({e}); run in the venv made by .ci/vllm-setup.sh", allow_module_level=True)

from llmquant.config import LayerQuant, QuantConfig, QuantConfigError
from llmquant.formats.packing import dequantize_packed, encode_scales, pack_zeros
from llmquant.formats.rotation import layer_signs, rotate, unpack_signs
from llmquant.kernels import dequant_matmul_ref
from llmquant.kernels.registry import PackedWeight
from llmquant.quantizers.rtn import quantize_weight_rtn
from llmquant.serving.vllm import register
from llmquant.serving.vllm.linear import LlmQuantEmbeddingMethod, LlmQuantLinearMethod

pytestmark = pytest.mark.vllm

LLAMA_FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", autouse=True)
def vllm_env():
    """A one-process gloo group and a default VllmConfig, as a vLLM worker has them."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(
            world_size=1, rank=0, distributed_init_method=f"tcp://127.0.0.1:{port}", local_rank=0, backend="gloo"
        )
        initialize_model_parallel(1)
        register()
        try:
            yield
        finally:
            destroy_model_parallel()
            destroy_distributed_environment()


def make_config(**kw) -> object:
    cfg = get_quantization_config("llmquant").from_config(QuantConfig(**kw).to_dict())
    cfg.packed_modules_mapping = dict(LLAMA_FUSED)
    return cfg


def make_part(n: int, k: int, scheme: LayerQuant, *, seed: int, perm: bool, compact: bool = False) -> PackedWeight:
    """A quantized part [n, k] as the checkpoint stores it (perm: a random act-order permutation;
    compact: scales on the compact grid, see :func:`checkpoint_tensors`)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5  # a trained layer's scale: unit inputs give unit outputs
    pw = quantize_weight_rtn(w, scheme, compact=compact)
    if perm:
        pw.perm = torch.randperm(k, generator=g).to(torch.int32)
    return pw


def checkpoint_tensors(pw: PackedWeight, compact: bool = False) -> dict[str, torch.Tensor]:
    """The part's tensors as a checkpoint stores them (``compact``: compact_qparams' scale codes and
    bit-packed zero points)."""
    out = {"qweight": pw.qweight, "scales": encode_scales(pw.scales) if compact else pw.scales}
    if pw.zeros is not None:
        out["zeros"] = pack_zeros(pw.zeros, pw.bits) if compact else pw.zeros
    if pw.perm is not None:
        out["perm"] = pw.perm
    return out


def load(layer: torch.nn.Module, pw: PackedWeight, shard_id=None, rot_signs: torch.Tensor | None = None,
         compact: bool = False) -> None:
    """Feed one part's checkpoint tensors through the layer's weight loaders (as vLLM's loader does)."""
    params = dict(layer.named_parameters())
    tensors = checkpoint_tensors(pw, compact) | ({} if rot_signs is None else {"rot_signs": rot_signs})
    for name, t in tensors.items():
        p = params[name]
        if shard_id is None:
            p.weight_loader(p, t)
        else:
            p.weight_loader(p, t, shard_id)


def finish(layer: torch.nn.Module) -> None:
    layer.quant_method.process_weights_after_loading(layer)


def ref(x: torch.Tensor, parts: list[PackedWeight]) -> torch.Tensor:
    return torch.cat([dequant_matmul_ref(x, pw) for pw in parts], dim=-1)


SCHEMES = [
    LayerQuant(4, 32, True),
    LayerQuant(4, 128, False),
    LayerQuant(3, 64, True),  # 3-bit: codes straddle words; K=96 makes the last group ragged
    LayerQuant(2, 32, False),
    LayerQuant(8, -1, True),
]


# --- registration ----------------------------------------------------------------------------------
def test_register_is_idempotent_and_entry_point_is_installed():
    register()
    register()
    assert QUANTIZATION_METHODS.count("llmquant") == 1
    assert vllm_linear.WEIGHT_LOADER_V2_SUPPORTED.count("LlmQuantLinearMethod") == 1
    assert get_quantization_config("llmquant").get_name() == "llmquant"
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert [ep.value for ep in eps if ep.name == "llmquant"] == ["llmquant.serving.vllm:register"]


def test_from_config_rejects_a_bad_config_by_name():
    cls = get_quantization_config("llmquant")
    bad = QuantConfig().to_dict() | {"bits": 5}
    with pytest.raises(QuantConfigError, match="bits must be one of"):
        cls.from_config(bad)
    with pytest.raises(QuantConfigError, match="unknown fields"):
        cls.from_config(QuantConfig().to_dict() | {"desc_act": True})
    with pytest.raises(QuantConfigError, match="rotation"):
        cls.from_config(QuantConfig().to_dict() | {"rotation": "givens"})


def test_quantized_embedding_gathers_rows_and_a_tied_head_shares_them():
    vocab, k = 1000, 64  # vLLM pads the vocabulary to 1024 rows
    cfg = make_config(bits=4, group_size=32, sym=False, method="gptq", act_order=True, quantize_lm_head=True,
                      quantize_embedding=True)
    emb = VocabParallelEmbedding(vocab, k, params_dtype=torch.float32, quant_config=cfg, prefix="model.embed_tokens")
    assert isinstance(emb.quant_method, LlmQuantEmbeddingMethod) and emb.perm is None  # a table has no perm
    pw = make_part(vocab, k, cfg.resolve("model.embed_tokens"), seed=0, perm=False)
    load(emb, pw)
    finish(emb)
    ids = torch.tensor([[0, 5, 999], [17, 17, 3]])
    table = dequantize_packed(pw.qweight, pw.scales, pw.zeros, bits=4, group_size=32, in_features=k)
    assert torch.equal(emb(ids), table[ids])
    x = torch.randn(2, k)
    # logits through the embedding itself (vLLM's Gemma 3), and through a head tied to it (vLLM's Llama)
    torch.testing.assert_close(emb.quant_method.apply(emb, x)[:, :vocab], dequant_matmul_ref(x, pw), **TOL)
    head = ParallelLMHead(vocab, k, params_dtype=torch.float32, quant_config=cfg, prefix="lm_head").tie_weights(emb)
    finish(head)
    assert head.qweight is emb.qweight and head.scales is emb.scales
    torch.testing.assert_close(head.quant_method.apply(head, x)[:, :vocab], dequant_matmul_ref(x, pw), **TOL)
    other = make_config(bits=4, group_size=32, quantize_lm_head=True, quantize_embedding=True,
                        overrides={"lm_head": {"bits": 8}})
    head8 = ParallelLMHead(vocab, k, params_dtype=torch.float32, quant_config=other, prefix="lm_head")
    with pytest.raises(ValueError, match="not quantized with the head's scheme"):
        head8.tie_weights(emb)


@pytest.mark.parametrize("tied", [False, True])
def test_an_untied_models_embedding_keeps_no_kernel_copy(monkeypatch, tied):
    """The table's kernel copy is made only when the model config ties the output layer to the embedding
    (logits through it); an untied model's lookups read the packed tensors alone, and logits asked of it fail
    clearly. The flag is read from the config vLLM builds the model under (top-level or text config)."""
    import types

    from llmquant.serving.vllm import linear as vl

    hf = types.SimpleNamespace(tie_word_embeddings=tied)
    vcfg = types.SimpleNamespace(model_config=types.SimpleNamespace(hf_config=hf, hf_text_config=hf))
    monkeypatch.setattr(vl, "get_current_vllm_config_or_none", lambda: vcfg)
    vocab, k = 1000, 64
    cfg = make_config(bits=4, group_size=32, quantize_lm_head=True, quantize_embedding=True)
    emb = VocabParallelEmbedding(vocab, k, params_dtype=torch.float32, quant_config=cfg, prefix="model.embed_tokens")
    pw = make_part(vocab, k, cfg.resolve("model.embed_tokens"), seed=1, perm=False)
    load(emb, pw)
    finish(emb)
    ids = torch.tensor([[0, 5, 999]])
    table = dequantize_packed(pw.qweight, pw.scales, pw.zeros, bits=4, group_size=32, in_features=k)
    assert torch.equal(emb(ids), table[ids])
    x = torch.randn(2, k)
    if tied:
        assert emb.llmquant_runs
        torch.testing.assert_close(emb.quant_method.apply(emb, x)[:, :vocab], dequant_matmul_ref(x, pw), **TOL)
    else:
        assert emb.llmquant_runs is None
        with pytest.raises(RuntimeError, match="does not tie the output layer"):
            emb.quant_method.apply(emb, x)
    assert vl.config_ties_embeddings() is tied
    monkeypatch.setattr(vl, "get_current_vllm_config_or_none", lambda: None)
    assert vl.config_ties_embeddings()  # a layer built outside a model: prepared, as before


def test_embedding_without_a_prefix_resolves_as_model_embed_tokens():
    """vLLM's Llama builds embed_tokens without a prefix: its override still applies (bits 8 here)."""
    cfg = make_config(bits=4, group_size=32, quantize_embedding=True, overrides={"embed_tokens": {"bits": 8}})
    emb = VocabParallelEmbedding(1000, 64, params_dtype=torch.float32, quant_config=cfg)
    assert isinstance(emb.quant_method, LlmQuantEmbeddingMethod) and emb.quant_method.scheme.bits == 8


def test_float_embedding_stays_vllms():
    emb = VocabParallelEmbedding(1000, 64, params_dtype=torch.float32, quant_config=make_config(quantize_lm_head=True),
                                 prefix="model.embed_tokens")
    assert not isinstance(emb.quant_method, LlmQuantLinearMethod) and emb.weight.shape == (1024, 64)


# --- fused and plain layers, one rank --------------------------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@pytest.mark.parametrize("perm", ["none", "shared", "per-part"])
def test_qkv_parallel_linear_matches_reference(scheme, perm):
    k, head, nh, nkv = 96, 32, 4, 2
    cfg = make_config(
        bits=scheme.bits, group_size=scheme.group_size, sym=scheme.sym,
        method="gptq" if perm != "none" else "rtn", act_order=perm != "none",
    )
    layer = QKVParallelLinear(
        k, head, nh, nkv, bias=False, params_dtype=torch.float32, quant_config=cfg,
        prefix="model.layers.0.self_attn.qkv_proj",
    )
    assert isinstance(layer.quant_method, LlmQuantLinearMethod)
    sizes = {"q": nh * head, "k": nkv * head, "v": nkv * head}
    parts = {sid: make_part(n, k, scheme, seed=i, perm=perm != "none") for i, (sid, n) in enumerate(sizes.items())}
    if perm == "shared":
        for pw in parts.values():
            pw.perm = parts["q"].perm
    for sid in ("v", "q", "k"):  # the loader sees parts in checkpoint order, not q-k-v order
        load(layer, parts[sid], sid)
    finish(layer)
    assert len(layer.llmquant_runs) == (3 if perm == "per-part" else 1)
    x = torch.randn(5, k)
    y, _ = layer(x)
    torch.testing.assert_close(y, ref(x, [parts["q"], parts["k"], parts["v"]]), **TOL)


def test_merged_gate_up_and_row_parallel_down_with_bias():
    k, inter = 128, 256
    cfg = make_config(bits=4, group_size=32, sym=False)
    gate_up = MergedColumnParallelLinear(
        k, [inter, inter], bias=False, params_dtype=torch.float32, quant_config=cfg,
        prefix="model.layers.0.mlp.gate_up_proj",
    )
    down = RowParallelLinear(
        inter, k, bias=True, params_dtype=torch.float32, quant_config=cfg, prefix="model.layers.0.mlp.down_proj"
    )
    scheme = cfg.resolve("model.layers.0.mlp.gate_up_proj")
    gate, up = make_part(inter, k, scheme, seed=1, perm=False), make_part(inter, k, scheme, seed=2, perm=False)
    load(gate_up, up, 1)
    load(gate_up, gate, 0)
    finish(gate_up)
    dw = make_part(k, inter, scheme, seed=3, perm=False)
    load(down, dw)
    bias = torch.randn(k)
    down.bias.weight_loader(down.bias, bias)
    finish(down)
    x = torch.randn(7, k)
    h, _ = gate_up(x)
    torch.testing.assert_close(h, ref(x, [gate, up]), **TOL)
    act = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]  # what the MLP feeds down_proj
    y, _ = down(act)
    torch.testing.assert_close(y, dequant_matmul_ref(act, dw, bias), **TOL)


@pytest.mark.parametrize("scheme", [LayerQuant(3, 32, False), LayerQuant(4, 64, True), LayerQuant(2, -1, False)], ids=str)
def test_compact_qparams_fused_and_row_parallel_layers_match_the_reference(scheme):
    """compact_qparams checkpoints: uint8 scale codes and bit-packed zero points load through vLLM's loaders
    (fused parts in any order) and run like the plain tensors they decode to."""
    k, head, nh, nkv, inter = 96, 32, 4, 2, 160
    cfg = make_config(bits=scheme.bits, group_size=scheme.group_size, sym=scheme.sym, compact_qparams=True)
    qkv = QKVParallelLinear(k, head, nh, nkv, bias=False, params_dtype=torch.float32, quant_config=cfg,
                            prefix="model.layers.0.self_attn.qkv_proj")
    assert qkv.scales.dtype == torch.uint8
    sizes = {"q": nh * head, "k": nkv * head, "v": nkv * head}
    parts = {sid: make_part(n, k, scheme, seed=i, perm=False, compact=True) for i, (sid, n) in enumerate(sizes.items())}
    for sid in ("k", "v", "q"):
        load(qkv, parts[sid], sid, compact=True)
    finish(qkv)
    assert qkv.scales.dtype == torch.float16
    x = torch.randn(5, k)
    torch.testing.assert_close(qkv(x)[0], ref(x, [parts["q"], parts["k"], parts["v"]]), **TOL)
    down = RowParallelLinear(inter, k, bias=False, params_dtype=torch.float32, quant_config=cfg,
                             prefix="model.layers.0.mlp.down_proj")
    dw = make_part(k, inter, scheme, seed=7, perm=False, compact=True)
    load(down, dw, compact=True)
    finish(down)
    h = torch.randn(3, inter)
    torch.testing.assert_close(down(h)[0], dequant_matmul_ref(h, dw), **TOL)


def make_rotated_part(n: int, k: int, scheme: LayerQuant, signs: torch.Tensor, *, seed: int, perm: bool):
    """A rotated part as llmquant stores it: the codes of W R (R from ``signs``); returns it with the float W."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    pw = quantize_weight_rtn(rotate(w, unpack_signs(signs, k)), scheme)
    if perm:
        pw.perm = torch.randperm(k, generator=g).to(torch.int32)
    return pw


def rotated_ref(x: torch.Tensor, parts: list[tuple[PackedWeight, torch.Tensor]]) -> torch.Tensor:
    k = x.shape[-1]
    return torch.cat([dequant_matmul_ref(rotate(x, unpack_signs(s, k)), pw) for pw, s in parts], dim=-1)


@pytest.mark.parametrize("signs", ["shared", "per-part"])
@pytest.mark.parametrize("perm", [False, True])
def test_rotated_qkv_matches_the_reference(signs, perm):
    """Rotated layers (rotation='hadamard'): x R, then the layer's kernel; parts that share signs (as
    llmquant draws them) rotate once and run as one call, parts with their own signs as one call each."""
    k, head, nh, nkv = 256, 32, 4, 2
    scheme = LayerQuant(4, 64, False)
    cfg = make_config(bits=4, group_size=64, sym=False, method="gptq", act_order=perm, rotation="hadamard")
    layer = QKVParallelLinear(k, head, nh, nkv, bias=False, params_dtype=torch.float32, quant_config=cfg,
                              prefix="model.layers.0.self_attn.qkv_proj")
    sizes = {"q": nh * head, "k": nkv * head, "v": nkv * head}
    sign = {sid: layer_signs(f"model.layers.0.self_attn.{sid if signs == 'per-part' else 'q'}_proj_x", k) for sid in sizes}
    parts = {sid: make_rotated_part(n, k, scheme, sign[sid], seed=i, perm=perm) for i, (sid, n) in enumerate(sizes.items())}
    if perm:
        for pw in parts.values():
            pw.perm = parts["q"].perm
    for sid in ("k", "v", "q"):
        load(layer, parts[sid], sid, rot_signs=sign[sid])
    finish(layer)
    assert len(layer.llmquant_runs) == (1 if signs == "shared" else 3)
    x = torch.randn(5, k)
    y, _ = layer(x)
    torch.testing.assert_close(y, rotated_ref(x, [(parts[s], sign[s]) for s in "qkv"]), **TOL)
    # dequantize_weight is the float layer the codes stand for (rotated back), in input order
    w = layer.quant_method.dequantize_weight(layer)
    torch.testing.assert_close(x @ w.T, y, **TOL)


def test_rotated_layer_without_its_signs_fails_after_loading():
    k = 128
    cfg = make_config(bits=4, group_size=32, rotation="hadamard")
    layer = MergedColumnParallelLinear(k, [32, 32], bias=False, params_dtype=torch.float32, quant_config=cfg,
                                       prefix="model.layers.0.mlp.gate_up_proj")
    assert layer.rot_signs.shape == (2, k // 8)
    scheme = cfg.resolve("model.layers.0.mlp.gate_up_proj")
    s = layer_signs("model.layers.0.mlp.gate_proj", k)
    load(layer, make_rotated_part(32, k, scheme, s, seed=0, perm=False), 0, rot_signs=s)
    load(layer, make_rotated_part(32, k, scheme, s, seed=1, perm=False), 1)  # the checkpoint lacks up_proj.rot_signs
    with pytest.raises(ValueError, match=r"rot_signs \(fused part 1\): missing"):
        finish(layer)
    # a layer whose K is not whole rotation blocks is stored unrotated, and so declared
    plain = RowParallelLinear(96, 64, bias=False, params_dtype=torch.float32, quant_config=cfg,
                              prefix="model.layers.0.mlp.down_proj")
    assert plain.rot_signs is None


def test_dequantize_weight_is_the_float_layer_in_input_order():
    k = 64
    cfg = make_config(bits=3, group_size=32, method="gptq", act_order=True)
    layer = MergedColumnParallelLinear(
        k, [32, 32], bias=False, params_dtype=torch.float32, quant_config=cfg, prefix="mlp.gate_up_proj"
    )
    scheme = cfg.resolve("mlp.gate_up_proj")
    parts = [make_part(32, k, scheme, seed=i, perm=True) for i in range(2)]
    for i, pw in enumerate(parts):
        load(layer, pw, i)
    finish(layer)
    w = layer.quant_method.dequantize_weight(layer)
    x = torch.randn(3, k)
    torch.testing.assert_close(x @ w.T, ref(x, parts), **TOL)


def test_skipped_and_unfused_layers_resolve_as_the_config_says():
    cfg = make_config(bits=4, group_size=32, overrides={"*.o_proj": "skip", "*.down_proj": {"bits": 8}})
    o = RowParallelLinear(64, 64, bias=False, params_dtype=torch.float32, quant_config=cfg, prefix="model.layers.0.self_attn.o_proj")
    assert isinstance(o.quant_method, UnquantizedLinearMethod)
    down = RowParallelLinear(64, 64, bias=False, params_dtype=torch.float32, quant_config=cfg, prefix="model.layers.0.mlp.down_proj")
    assert down.quant_method.scheme == LayerQuant(8, 32, True)


def test_fused_parts_with_different_schemes_are_refused_by_name():
    cfg = make_config(bits=4, group_size=32, overrides={"*.k_proj": {"bits": 8}})
    with pytest.raises(ValueError, match=r"k_proj.*different schemes"):
        QKVParallelLinear(64, 32, 2, 1, bias=False, params_dtype=torch.float32, quant_config=cfg, prefix="model.layers.0.self_attn.qkv_proj")


def test_a_part_without_perm_fails_after_loading():
    cfg = make_config(bits=4, group_size=32, method="gptq", act_order=True)
    layer = MergedColumnParallelLinear(64, [32, 32], bias=False, params_dtype=torch.float32, quant_config=cfg, prefix="mlp.gate_up_proj")
    scheme = cfg.resolve("mlp.gate_up_proj")
    load(layer, make_part(32, 64, scheme, seed=0, perm=True), 0)
    up = make_part(32, 64, scheme, seed=1, perm=True)
    up.perm = None  # the checkpoint lacks up_proj.perm
    load(layer, up, 1)
    with pytest.raises(ValueError, match=r"perm \(fused part 1\): not a permutation"):
        finish(layer)


def test_quantized_lm_head_pads_the_vocabulary_with_zero_rows():
    vocab, k = 1000, 64  # vLLM pads the vocabulary to 1024 rows
    cfg = make_config(bits=4, group_size=32, quantize_lm_head=True)
    head = ParallelLMHead(vocab, k, params_dtype=torch.float32, quant_config=cfg, prefix="lm_head")
    assert isinstance(head.quant_method, LlmQuantLinearMethod)
    pw = make_part(vocab, k, cfg.resolve("lm_head"), seed=0, perm=False)
    load(head, pw)
    finish(head)
    x = torch.randn(2, k)
    logits = head.quant_method.apply(head, x)
    assert logits.shape == (2, head.num_embeddings_per_partition)
    torch.testing.assert_close(logits[:, :vocab], dequant_matmul_ref(x, pw), **TOL)
    assert torch.all(logits[:, vocab:] == 0)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        head.tie_weights(head)


def test_float_lm_head_stays_vllms():
    head = ParallelLMHead(1000, 64, params_dtype=torch.float32, quant_config=make_config(), prefix="lm_head")
    assert not isinstance(head.quant_method, LlmQuantLinearMethod)


# --- tensor parallelism (ranks simulated one at a time) --------------------------------------------
def build_on_rank(monkeypatch, rank: int, size: int, ctor):
    monkeypatch.setattr(vllm_linear, "get_tensor_model_parallel_rank", lambda: rank)
    monkeypatch.setattr(vllm_linear, "get_tensor_model_parallel_world_size", lambda: size)
    return ctor()


@pytest.mark.parametrize("scheme", [LayerQuant(4, 32, False), LayerQuant(3, 64, True), LayerQuant(8, -1, True)], ids=str)
def test_tensor_parallel_qkv_and_row_shards_reassemble_to_the_reference(monkeypatch, scheme):
    tp, k, head, nh, nkv = 2, 128, 32, 4, 2
    cfg = make_config(bits=scheme.bits, group_size=scheme.group_size, sym=scheme.sym)
    sizes = {"q": nh * head, "k": nkv * head, "v": nkv * head}
    parts = {sid: make_part(n, k, scheme, seed=i, perm=False) for i, (sid, n) in enumerate(sizes.items())}
    o_proj = make_part(k, nh * head, scheme, seed=9, perm=False)  # K_o = 128 -> 64 per rank
    bias = torch.randn(k)
    x = torch.randn(3, k)
    q_out, k_out, v_out, o_sum = [], [], [], torch.zeros(3, k)
    h = torch.randn(3, nh * head)
    for rank in range(tp):
        qkv = build_on_rank(monkeypatch, rank, tp, lambda: QKVParallelLinear(
            k, head, nh, nkv, bias=False, params_dtype=torch.float32, quant_config=cfg, prefix="l.qkv_proj"))
        for sid, pw in parts.items():
            load(qkv, pw, sid)
        finish(qkv)
        y = qkv.quant_method.apply(qkv, x)  # this rank's [q_r | k_r | v_r]
        nq, nk = sizes["q"] // tp, sizes["k"] // tp
        q_out.append(y[:, :nq])
        k_out.append(y[:, nq:nq + nk])
        v_out.append(y[:, nq + nk:])
        o = build_on_rank(monkeypatch, rank, tp, lambda: RowParallelLinear(
            nh * head, k, bias=True, params_dtype=torch.float32, quant_config=cfg, prefix="l.o_proj"))
        load(o, o_proj)
        o.bias.weight_loader(o.bias, bias)
        finish(o)
        cut = h[:, rank * (nh * head // tp):(rank + 1) * (nh * head // tp)]
        o_sum += o.quant_method.apply(o, cut)  # vLLM's all-reduce sums the ranks' partial products
    y_full = torch.cat([torch.cat(q_out, -1), torch.cat(k_out, -1), torch.cat(v_out, -1)], -1)
    torch.testing.assert_close(y_full, ref(x, [parts["q"], parts["k"], parts["v"]]), **TOL)
    torch.testing.assert_close(o_sum + bias, dequant_matmul_ref(h, o_proj, bias), **TOL)


def test_tensor_parallel_rotated_row_shards_reassemble_to_the_reference(monkeypatch):
    """A row-parallel rotated layer: each rank keeps the signs of its K columns (whole 128-column blocks),
    rotates its slice of x, and the ranks' partial products sum to the rotated layer's output."""
    tp, k, n = 2, 512, 96
    cfg = make_config(bits=4, group_size=128, sym=True, rotation="hadamard")
    signs = layer_signs("l.down_proj", k)
    down = make_rotated_part(n, k, LayerQuant(4, 128, True), signs, seed=4, perm=False)
    x = torch.randn(3, k)
    y = torch.zeros(3, n)
    for rank in range(tp):
        layer = build_on_rank(monkeypatch, rank, tp, lambda: RowParallelLinear(
            k, n, bias=False, params_dtype=torch.float32, quant_config=cfg, prefix="l.down_proj"))
        assert layer.rot_signs.shape == (k // tp // 8,)
        load(layer, down, rot_signs=signs)
        finish(layer)
        y += layer.quant_method.apply(layer, x[:, rank * (k // tp):(rank + 1) * (k // tp)])
    torch.testing.assert_close(y, rotated_ref(x, [(down, signs)]), **TOL)


@pytest.mark.parametrize(
    "k, tp, kw, why",
    [
        (96, 2, dict(group_size=32), "K per rank \\(48\\) is not a multiple of 32"),
        (256, 4, dict(group_size=32, rotation="hadamard"), "not a multiple of 128, the rotation block"),
        (128, 2, dict(group_size=128), "not a multiple of the group size 128"),
        (128, 2, dict(group_size=32, method="gptq", act_order=True), "act-order"),
        (128, 2, dict(group_size=32, sym=False, compact_qparams=True), "compact zero points"),
    ],
)
def test_row_parallel_cuts_that_do_not_divide_are_refused(monkeypatch, k, tp, kw, why):
    cfg = make_config(bits=4, **kw)
    with pytest.raises(ValueError, match=why):
        build_on_rank(monkeypatch, 0, tp, lambda: RowParallelLinear(
            k, 64, bias=False, params_dtype=torch.float32, quant_config=cfg, prefix="model.layers.0.mlp.down_proj"))
