"""The Triton dequant-GEMM against ``dequant_matmul_ref``, run on the CPU through Triton's interpreter.

Tolerances (STYLE.md): fp32 outputs ``assert_close(rtol=1e-5, atol=1e-5 * max|ref|)``; fp16 outputs
relative mean absolute error (mean|y - ref| / mean|ref|, ref in fp32) below 1e-3. The interpreter
has no bf16 arithmetic, so bf16 is checked on a GPU only (``bench/triton_gpu.py``).

The interpreter is slow, so the default grid visits every M, shape, group size, sym/asym and
act-order value without taking their full product; the product is marked slow.
"""
import importlib
import importlib.util
import itertools
import os

import pytest
import torch

# Triton decides at decoration time whether ``@triton.jit`` compiles or interprets, and its own
# library functions (tl.cdiv, ...) are decorated when triton is first imported: so import it here,
# at collection, with TRITON_INTERPRET=1, then put the variable back at once so that other test
# modules do not see it (with it set, the registry offers this kernel for CPU layers). The fixture
# below sets it again while this module's tests run.
_saved = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    triton = pytest.importorskip("triton")
finally:
    if _saved is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _saved

from llmquant.config import LayerQuant  # noqa: E402
from llmquant.kernels import dequant_matmul_ref, select_kernel  # noqa: E402
from llmquant.kernels.registry import PackedWeight  # noqa: E402
from llmquant.kernels.triton_w4a16 import (  # noqa: E402
    TritonConfig,
    TritonKernel,
    dequant_gemm,
    pick_config,
    prepare_weight,
)
from llmquant.modules.quant_linear import QuantLinear  # noqa: E402
from llmquant.quantizers.rtn import quantize_weight_rtn  # noqa: E402


def _jit_interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    from llmquant.kernels import triton_w4a16_jit

    return isinstance(triton_w4a16_jit.dequant_gemm_kernel, InterpretedFunction)


@pytest.fixture(autouse=True, scope="module")
def interpreter():
    """TRITON_INTERPRET=1 while this module runs. The program's module is (re)loaded under it, and
    reloaded back afterwards if it had been compiled."""
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(triton.language.standard.cdiv, InterpretedFunction):
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run this file on its own")
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    from llmquant.kernels import triton_w4a16_jit

    reloaded = not _jit_interpreted()
    if reloaded:
        importlib.reload(triton_w4a16_jit)
    assert _jit_interpreted()
    yield
    mp.undo()
    if reloaded:
        importlib.reload(triton_w4a16_jit)


def make_weight(n, k, bits=4, group_size=128, sym=True, act_order=False, seed=0) -> PackedWeight:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if not sym:
        w = w + 0.7 * torch.rand(n, 1, generator=g)  # lopsided ranges: zero points far from 2**(b-1)
    pw = quantize_weight_rtn(w, LayerQuant(bits, group_size, sym))
    if act_order:
        pw.perm = torch.randperm(k, generator=g).to(torch.int32)
    return pw


def check_close(y: torch.Tensor, x: torch.Tensor, w: PackedWeight, bias=None) -> None:
    ref = dequant_matmul_ref(x.to(torch.float32), w, None if bias is None else bias.to(torch.float32))
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()
    if x.dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * max(1.0, float(ref.abs().max())))
    else:
        rel = float((y.to(torch.float32) - ref).abs().mean() / ref.abs().mean().clamp(min=1e-12))
        assert rel < 1e-3, f"relative mean abs error {rel:.2e} >= 1e-3"


def run_case(m, n, k, group_size, sym, act_order, dtype, config=None, bits=4, bias=True, seed=0):
    w = make_weight(n, k, bits, group_size, sym, act_order, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    y = dequant_gemm(x, prepare_weight(w), b, config)
    check_close(y, x, w, b)


# (N, K): on the 64/128 tile grid; off it in N and K (K % 32 != 0, so the last packing block is
# padded); K = 576 as in SmolLM2 (ragged last group of 64 for G = 128); tiny K below one tile.
SHAPES = [(64, 256), (100, 200), (33, 576), (48, 40)]
MS = [1, 2, 3, 7, 16, 33, 128]
GROUPS = [32, 64, 128, -1]


def _fast_grid():
    # Walk every M; cycle the other axes at co-prime periods so that each value of each axis, and
    # most pairs, come up without the full product.
    cases = []
    for i, (m, dtype) in enumerate(itertools.product(MS, [torch.float32, torch.float16])):
        n, k = SHAPES[i % 4]
        cases.append((m, n, k, GROUPS[(i // 2 + i) % 4], i % 3 != 0, i % 5 in (1, 3), dtype))
    return cases


def _case_id(c):
    m, n, k, g, sym, act, dtype = c
    return f"M{m}-N{n}-K{k}-G{g}-{'sym' if sym else 'asym'}{'-act' if act else ''}-{str(dtype)[6:]}"


@pytest.mark.parametrize("case", _fast_grid(), ids=_case_id)
def test_matches_reference(case):
    run_case(*case)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [(m, n, k, g, s, a, d)
     for m in MS for (n, k) in SHAPES for g in GROUPS for s in (True, False)
     for a in (False, True) for d in (torch.float32, torch.float16)],
    ids=_case_id,
)
def test_matches_reference_full_grid(case):
    run_case(*case)


@pytest.mark.parametrize(
    "config",
    [
        TritonConfig(16, 16, 16),  # smallest tiles: many boundary programs
        TritonConfig(16, 32, 32, split_k=2),
        TritonConfig(16, 64, 64, split_k=3, unpack="reshape"),  # uneven split: 5 K tiles over 3
        TritonConfig(32, 32, 128, split_k=64),  # more splits than K tiles: clamped
        TritonConfig(16, 32, 64, group_m=2),  # band ordering: 3 M tiles in bands of 2
        TritonConfig(64, 128, 64),
        TritonConfig(16, 32, 32, unpack="reshape"),
        TritonConfig(32, 16, 128, unpack="reshape"),  # block_k > G = 64: per-element scale gather
        TritonConfig(16, 32, 64, split_k=3, deq="magic"),  # codes to floats by the 1024.0 / 2**23 trick
        TritonConfig(32, 16, 128, unpack="gather", deq="magic"),
        TritonConfig(16, 32, 64, split_k=3, operands="wx"),  # y^T = W x^T: the tile as left operand
        TritonConfig(32, 16, 128, operands="wx", deq="magic"),  # ... with per-element scales
        TritonConfig(16, 64, 32, group_m=2, operands="wx"),
        TritonConfig(16, 32, 64, split_k=3, prefetch=0),  # scales loaded where used, not a tile ahead
        TritonConfig(16, 64, 32, group_m=2, operands="wx", prefetch=0),
    ],
    ids=lambda c: "-".join(map(str, c.to_list())),
)
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_explicit_configs(config, sym):
    # M = 40 spans 3 tiles of 16 rows; N = 50 and K = 300 are off every tile boundary, and K is
    # off the group boundary (ragged last group of 44)
    run_case(40, 50, 300, 64, sym, act_order=not sym, dtype=torch.float32, config=config)


@pytest.mark.parametrize("bits", [8, 3, 2])
@pytest.mark.parametrize("unpack", ["gather", "reshape"])
@pytest.mark.parametrize("deq", ["cvt", "magic"])
def test_other_widths(bits, unpack, deq):
    cfg = TritonConfig(16, 32, 32, split_k=2, unpack=unpack, deq=deq)
    if unpack == "reshape" and deq == "magic":
        cfg = TritonConfig(16, 32, 32, split_k=2, deq=deq, operands="wx")
    run_case(5, 40, 100, 32, sym=False, act_order=False, dtype=torch.float32, config=cfg, bits=bits)
    run_case(5, 40, 100, -1, sym=True, act_order=True, dtype=torch.float16, config=cfg, bits=bits)


def test_batched_input_no_bias_and_empty():
    w = make_weight(24, 64, group_size=32, sym=False)
    st = prepare_weight(w)
    x = torch.randn(2, 3, 64)
    y = dequant_gemm(x, st)
    assert y.shape == (2, 3, 24)
    check_close(y.reshape(6, 24), x.reshape(6, 64), w)
    assert dequant_gemm(torch.randn(0, 64), st).shape == (0, 24)


def test_fp16_bias_with_fp32_activations():
    w = make_weight(40, 96, group_size=32)
    x = torch.randn(3, 96)
    b = torch.randn(40).half()
    check_close(dequant_gemm(x, prepare_weight(w), b), x, w, b.float())


def test_quant_linear_selects_triton_and_matches_reference(monkeypatch):
    w = make_weight(72, 160, group_size=32, sym=False, act_order=True)
    bias = torch.randn(72)
    mod = QuantLinear.from_packed(w, bias)
    monkeypatch.setenv("LLMQUANT_KERNEL", "triton")
    x = torch.randn(2, 5, 160)
    y = mod(x)
    kernel, _ = mod.kernel_for(torch.float32)
    assert kernel.name == "triton"
    check_close(y.reshape(10, 72), x.reshape(10, 160), w, bias)


@pytest.mark.parametrize(
    "m,k,g,sym,act,dtype,cfg",
    [
        (1, 300, 64, True, False, torch.float32, None),  # ragged K (padded third-bit word) and last group
        (7, 256, 128, False, True, torch.float16, None),
        (33, 200, -1, False, False, torch.float32, TritonConfig(32, 32, 64, operands="wx")),
        (3, 320, 32, True, True, torch.float16, TritonConfig(16, 64, 128, split_k=2, unpack="gather")),
        (5, 96, 32, False, False, torch.float32, TritonConfig(16, 32, 64, deq="magic", operands="wx")),
    ],
)
def test_three_bit(m, k, g, sym, act, dtype, cfg):
    # the stored 3-bit stream (codes straddling words) split into a 2-bit and a 1-bit plane
    run_case(m, 40, k, g, sym, act, dtype, config=cfg, bits=3)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quant_linear_keeps_one_copy_of_the_codes(monkeypatch, bits):
    # the Triton layout replaces the stored qweight (as the CPU kernel's does): rebuilt exactly to save or move
    w = make_weight(40, 200, bits=bits, group_size=64, sym=False)
    stored = w.qweight.clone()
    mod = QuantLinear.from_packed(w, None)
    monkeypatch.setenv("LLMQUANT_KERNEL", "triton")
    x = torch.randn(3, 200)
    y = mod(x)
    assert mod.qweight_released and mod.qweight.numel() == 0
    assert torch.equal(mod.state_dict()["qweight"], stored)
    mod.to(torch.float32)  # a move: the buffer comes back first
    assert not mod.qweight_released and torch.equal(mod.qweight, stored)
    torch.testing.assert_close(mod(x), y)


def test_registry_prefers_triton_only_where_it_can_run(monkeypatch):
    spec = make_weight(16, 64).spec(torch.float16)
    assert select_kernel(spec).name == "triton"  # highest priority, interpreter on
    monkeypatch.delenv("TRITON_INTERPRET")
    assert select_kernel(spec).name != "triton"


def test_can_implement_reasons(monkeypatch):
    kern = TritonKernel()
    base = make_weight(16, 64).spec(torch.float16)

    def why(**changes):
        ok, reason = kern.can_implement(base.__class__(**{**base.__dict__, **changes}))
        assert not ok and reason
        return reason

    assert kern.can_implement(base) == (True, "")
    assert kern.can_implement(base.__class__(**{**base.__dict__, "dtype": torch.float32}))[0]
    assert kern.can_implement(base.__class__(**{**base.__dict__, "bits": 3}))[0]
    assert "bits=5" in why(bits=5)
    assert "bf16" in why(dtype=torch.bfloat16)  # interpreter only
    assert "int8" in why(dtype=torch.int8)
    assert "mps" in why(device_type="mps")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET" in why()
    if not torch.cuda.is_available():
        assert "CUDA is not available" in why(device_type="cuda")
    # every reason is listed, not just the first
    r = why(bits=5, device_type="cpu")
    assert "bits=5" in r and "TRITON_INTERPRET" in r
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "triton" else real_find_spec(n, *a))
    assert "triton is not installed" in why(device_type="cuda")


def test_invalid_shapes_raise():
    st = prepare_weight(make_weight(24, 64, group_size=32, sym=False))
    with pytest.raises(ValueError, match="x has 63 features, the layer expects K=64"):
        dequant_gemm(torch.randn(2, 63), st)
    op = torch.ops.llmquant.triton_dequant_gemm
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"qweight_t must be int32 \[8, N\] for K=64"):
        op(x, st.qweight_t[:4], None, st.scales_t, st.zeros_t, None, 4, 32, [])
    with pytest.raises(ValueError, match=r"scales_t must be fp16 \[NG=2, N=24\]"):
        op(x, st.qweight_t, None, st.scales_t[:1], st.zeros_t, None, 4, 32, [])
    with pytest.raises(ValueError, match=r"zeros_t must be uint8 \[NG=2, N=24\]"):
        op(x, st.qweight_t, None, st.scales_t, st.zeros_t.to(torch.int32), None, 4, 32, [])
    with pytest.raises(ValueError, match=r"bias must be \[N=24\], got \(23,\)"):
        op(x, st.qweight_t, None, st.scales_t, st.zeros_t, torch.zeros(23), 4, 32, [])
    with pytest.raises(ValueError, match="bits must be one of"):
        op(x, st.qweight_t, None, st.scales_t, st.zeros_t, None, 5, 32, [])
    with pytest.raises(ValueError, match="block_n must be a power of two >= 16"):
        dequant_gemm(x, st, config=TritonConfig(16, 24, 32))
    st3 = prepare_weight(make_weight(24, 64, bits=3, group_size=32, sym=False))
    with pytest.raises(ValueError, match="qhigh_t .* goes with 3-bit layers"):
        op(x, st3.qweight_t, None, st3.scales_t, st3.zeros_t, None, 3, 32, [])
    with pytest.raises(ValueError, match=r"qhigh_t must be int32 \[2, N=24\]"):
        op(x, st3.qweight_t, st3.qhigh_t[:1], st3.scales_t, st3.zeros_t, None, 3, 32, [])
    with pytest.raises(ValueError, match="3-bit layers need block_k >= 32"):
        dequant_gemm(x, st3, config=TritonConfig(16, 16, 16))
    pw = make_weight(24, 64)
    pw.scales = pw.scales[:, :0]
    with pytest.raises(ValueError, match=r"scales must be \[N=24, NG=1\], got \(24, 0\)"):
        prepare_weight(pw)


def test_prefetch_changes_no_bit_and_old_config_lists_load():
    # the scale prefetch only moves a load: the two programs give the same bits (3 splits, asym)
    st = prepare_weight(make_weight(40, 320, group_size=64, sym=False))
    x = torch.randn(5, 320)
    ys = [dequant_gemm(x, st, config=TritonConfig(16, 32, 64, split_k=3, prefetch=p)) for p in (0, 1)]
    assert torch.equal(ys[0], ys[1])
    assert TritonConfig.from_list([16, 32, 64, 3, 8, 4, 3, 1, 0, 0]) == TritonConfig(16, 32, 64, split_k=3)
    with pytest.raises(ValueError, match="prefetch must be 0 or 1"):
        TritonConfig(16, 32, 64, prefetch=2).check()


def test_pick_config():
    # decode on a 132-SM GPU: 16-row tiles, K split at least 8 ways, more when output tiles are few
    c = pick_config(1, 4096, 4096, 128, num_sms=132)
    assert (c.block_m, c.block_k, c.split_k) == (16, 128, 8)
    assert pick_config(16, 11008, 4096, 128, 132).split_k == 8
    assert pick_config(1, 256, 4096, 128, 132).split_k == 32  # 4 output tiles: 2 * 132 / 4, whole K tiles
    assert pick_config(1, 1536, 576, 128, 132).split_k == 5  # one K tile a split at most
    # block_k divides the group size so each K tile reads one scale row
    assert pick_config(1, 4096, 4096, 32, 132).block_k == 32
    assert pick_config(512, 4096, 4096, 128, 132).split_k == 1  # enough output tiles: no fp32 partials
    # too few 128x128 tiles for 132 SMs: 128 x 64, so 128 rows of x share each dequantized tile;
    # K split in two where K is long, not where it is short
    assert pick_config(128, 4096, 4096, 128, 132).to_list()[:4] == [128, 64, 64, 2]
    assert pick_config(256, 4096, 4096, 128, 132).to_list()[:6] == [256, 64, 64, 2, 8, 8]  # 256 rows, 8 warps
    assert pick_config(256, 2048, 640, 128, 132).to_list()[:4] == [128, 64, 64, 1]
    assert pick_config(4096, 4096, 4096, 128, 132).block_m == 128
    for m, n, k, g in itertools.product([1, 7, 33, 128, 1000], [24, 4096], [40, 576, 11008], [32, 64, 128, 576]):
        pick_config(m, n, k, g, 132).check()


def test_opcheck_and_compile():
    st = prepare_weight(make_weight(40, 96, group_size=32, sym=False))
    x = torch.randn(3, 96)
    b = torch.randn(40)
    op = torch.ops.llmquant.triton_dequant_gemm.default
    torch.library.opcheck(op, (x, st.qweight_t, None, st.scales_t, st.zeros_t, b, 4, 32, []))
    st3 = prepare_weight(make_weight(40, 96, bits=3, group_size=32))
    torch.library.opcheck(op, (x, st3.qweight_t, st3.qhigh_t, st3.scales_t, None, b, 3, 32, []))

    compiled = torch.compile(lambda t: dequant_gemm(t, st, b), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), dequant_gemm(x, st, b))



_AOT_SCRIPT = r"""
import json, os, subprocess, sys, tempfile
import torch, triton
from llmquant.kernels.triton_w4a16 import pick_config
from llmquant.kernels.triton_w4a16_jit import compile_for_target

SMS = {80: 108, 90: 132}  # A100, H100/H200
SMEM = {80: 166912, 90: 232448}  # max shared memory per block, bytes
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
rows = []
for arch, dtype, bits, zeros, m in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype)
    cfg = pick_config(m, 4096, 4096, 128, SMS[arch])
    k = compile_for_target(arch, dtype, bits=bits, has_zeros=zeros, has_bias=True, group_per_tile=True, cfg=cfg)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        res = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    ptx = k.asm["ptx"]
    rows.append(dict(arch=arch, dtype=str(dtype), bits=bits, m=m, cfg=cfg.to_list(), shared=k.metadata.shared,
                     smem_limit=SMEM[arch], res=" ".join(l.strip() for l in res.splitlines() if "REG:" in l),
                     wgmma="wgmma" in ptx, mma="mma.sync" in ptx))
print(json.dumps(rows))
"""

# (arch, dtype, bits, asymmetric, M): decode, mid and large M; fp16, bf16; 4- and 8-bit
_AOT_CASES = [
    (90, "float16", 4, False, 1), (90, "bfloat16", 4, True, 4096), (90, "float16", 8, True, 64),
    (90, "float16", 3, True, 1), (90, "bfloat16", 3, False, 4096),
    (80, "float16", 4, True, 1), (80, "bfloat16", 4, False, 64), (80, "float16", 4, False, 4096),
]  # fmt: skip
_AOT_ALL = [(a, d, b, z, m) for a in (80, 90)
            for d, b in (("float16", 4), ("bfloat16", 4), ("float16", 8), ("float16", 3))
            for z in (False, True) for m in (1, 16, 64, 4096)]  # fmt: skip


def _check_compiles(cases):
    """No GPU here, but Triton ships ptxas: compile what ``pick_config`` picks for sm_80 and sm_90
    and check that shared memory fits the chip, nothing spills to local memory and the matrix
    instructions are there. In a subprocess: this module's process imported Triton to interpret."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _AOT_SCRIPT, json.dumps(cases)], env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == len(cases)
    for r in rows:
        assert r["shared"] <= r["smem_limit"], r
        assert "LOCAL:0" in r["res"] and "STACK:0" in r["res"], r  # no register spills
        if r["arch"] == 90 and r["m"] >= 64:
            assert r["wgmma"], r  # Hopper's warp-group MMA for the tiled path
        else:
            assert r["wgmma"] or r["mma"], r


def test_compiles_for_gpus_without_spills():
    _check_compiles(_AOT_CASES)


@pytest.mark.slow
def test_compiles_for_gpus_without_spills_all():
    _check_compiles(_AOT_ALL)
