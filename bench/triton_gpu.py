"""Check and time the Triton W4A16 kernel (kernels/triton_w4a16.py) on a CUDA GPU, in one run.

    python bench/triton_gpu.py --json out.json            # about 4 minutes, under --budget-s
    TRITON_INTERPRET=1 python bench/triton_gpu.py --dry-run --json dry.json   # CPU, tiny shapes

Phases, each inside its share of ``--budget-s`` (what does not fit is listed as skipped):

1. ceilings: device-to-device copy bandwidth (bytes read + written), the memory-bound ceiling;
2. correctness against ``dequant_matmul_ref`` over a shape grid (M in 1, 2, 3, 7, 16, 33, 128;
   N, K on and off tile boundaries; sym/asym; G = 32, 64, 128, one group, ragged; act-order;
   fp16, bf16, fp32; both unpack variants; forced split-K; a quarter of the cases 3-bit), with the
   tolerances of STYLE.md:
   fp32 assert_close(rtol=1e-5, atol=1e-5 * max|ref|), fp16 / bf16 relative mean abs error below
   1e-3 / 1e-2 (against the fp32 reference on the same inputs); plus torch.compile and CUDA-graph
   capture of the custom op;
3. speed against ``torch.nn.functional.linear`` in fp16 (cuBLAS) on the same shapes: M in 1, 4,
   16, 64, 256, 1024 times the Llama-7B projections (4096x4096, 11008x4096, 4096x11008) and every linear
   shape of the two default models (SmolLM2-135M, Gemma-3-270M); 4-bit, symmetric, G = 128,
   fp16 activations. Medians of ``triton.testing.do_bench`` ("eager": one launch at a time, L2
   flushed, Python launch cost included) and ``do_bench_cudagraph`` ("graph": launches replayed
   from a CUDA graph: kernel time); each timed call reads the next of several weight copies that
   together exceed 3x the L2, so weights come from HBM as in a real model;
   The default config is timed once more with ``deq="magic"`` (graph time, column "magic");
4. config sweep: a few alternatives to ``pick_config`` for decode and prefill shapes, graph time
   (``--heuristic``: instead, the default prefill config against the 64x128 tiles it replaced and
   against one and two K splits, M = 128, 256, 512; ``--prefill-sweep``: instead of phases 3-4, a
   wider sweep of tiles, splits, stages, band heights and the scale prefetch);
5. with ``--lowbit``: 2-, 3-, 4- and 8-bit layers at M = 1, 16, 256 on the Llama-7B shapes.

Prints a table last, writes everything (machine, versions, protocol, rows) to ``--json``.

``--profile N,K,M[,BITS[,CFG]]`` instead runs that one product 20 times (default config, or CFG as
``TritonConfig.to_list()`` ints joined by ``:``) for a profiler to attach, e.g. on the H200 (its
Firecracker runtime has hardware counters):

    ncu --clock-control none --set full -k regex:dequant_gemm_kernel -c 2 -o decode \
        python bench/triton_gpu.py --profile 4096,4096,1
"""
import argparse
import functools
import itertools
import json
import logging
import math
import os
import platform
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("triton_gpu")


def _import_llmquant_from_checkout() -> None:
    """Import llmquant's kernel modules from this checkout without running ``llmquant/__init__``
    (it registers with transformers, which this script does not need and whose version on a GPU
    image may differ from the pin). ``llmquant.kernels`` maps to ``kernels/`` as in pyproject."""
    pkg = types.ModuleType("llmquant")
    pkg.__path__ = [str(ROOT / "llmquant"), str(ROOT)]
    sys.modules["llmquant"] = pkg


_import_llmquant_from_checkout()

from llmquant.config import LayerQuant  # noqa: E402
from llmquant.kernels.reference import dequant_matmul_ref  # noqa: E402
from llmquant.kernels.triton_w4a16 import (  # noqa: E402
    TritonConfig,
    dequant_gemm,
    pick_config,
    prepare_weight,
    sm_count,
)
from llmquant.quantizers.rtn import quantize_weight_rtn  # noqa: E402

# (name, N, K)
LLAMA_SHAPES = [("llama7b.qkvo", 4096, 4096), ("llama7b.gate_up", 11008, 4096), ("llama7b.down", 4096, 11008)]
MODEL_SHAPES = [
    ("smollm2.q_o", 576, 576), ("smollm2.k_v", 192, 576), ("smollm2.gate_up", 1536, 576),
    ("smollm2.down", 576, 1536),
    ("gemma3.q", 1024, 640), ("gemma3.k_v", 256, 640), ("gemma3.o", 640, 1024), ("gemma3.gate_up", 2048, 640),
    ("gemma3.down", 640, 2048),
]  # fmt: skip
BENCH_MS = [1, 4, 16, 64, 256, 1024]
CHECK_MS = [1, 2, 3, 7, 16, 33, 128]
CHECK_SHAPES = [(64, 256), (100, 200), (33, 576), (48, 40), (4096, 4096), (1536, 576)]
GROUPS = [32, 64, 128, -1]


class Budget:
    def __init__(self, total_s: float):
        self.t0 = time.perf_counter()
        self.total = total_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left_until(self, fraction: float) -> bool:
        """True while the run is inside the first ``fraction`` of the budget."""
        return self.elapsed() < fraction * self.total


def make_weight(n, k, *, bits=4, group_size=128, sym=True, act_order=False, seed=0, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if not sym:
        w = w + 0.7 * torch.rand(n, 1, generator=g)
    pw = quantize_weight_rtn(w.to(device), LayerQuant(bits, group_size, sym))  # on the GPU: seconds saved
    if act_order:
        pw.perm = torch.randperm(k, generator=g).to(torch.int32).to(device)
    return pw


def error_of(y: torch.Tensor, ref32: torch.Tensor, dtype: torch.dtype) -> tuple[float, bool, str]:
    """(error, ok, metric) with STYLE.md's tolerances."""
    if not torch.isfinite(y).all():
        return float("nan"), False, "finite"
    if dtype == torch.float32:
        atol = 1e-5 * max(1.0, float(ref32.abs().max()))
        excess = float(((y - ref32).abs() - (atol + 1e-5 * ref32.abs())).max())
        return float((y - ref32).abs().max()), excess <= 0, f"max abs (atol {atol:.1e}, rtol 1e-5)"
    rel = float((y.float() - ref32).abs().mean() / ref32.abs().mean().clamp(min=1e-12))
    tol = 1e-3 if dtype == torch.float16 else 1e-2
    return rel, rel < tol, f"rel mean abs < {tol:g}"


def correctness(device, budget, dry, share):
    rows = []
    dtypes = [torch.float32, torch.float16] if dry else [torch.float16, torch.bfloat16, torch.float32]
    shapes = CHECK_SHAPES[:4] if dry else CHECK_SHAPES
    cases = []
    for i, (m, (n, k)) in enumerate(itertools.product(CHECK_MS, shapes)):
        dtype = dtypes[i % len(dtypes)]
        if dtype == torch.float32 and (n, k) == (4096, 4096):
            dtype = torch.float16  # fp32 programs compile slowly (FMA path); keep them to small shapes
        cfg = None
        if i % 7 == 3:
            cfg = TritonConfig(16, 32, 64, split_k=3)
        elif i % 7 == 5:
            cfg = TritonConfig(32, 64, 32, unpack="gather")
        elif i % 7 == 6:
            cfg = TritonConfig(16, 32, 64, split_k=2, deq="magic")
        elif i % 7 == 1:
            cfg = TritonConfig(16 if m <= 16 else 64, 64, 64, split_k=2 if m <= 16 else 1, operands="wx")
        cases.append(dict(m=m, n=n, k=k, g=GROUPS[(i // 2 + i) % 4], sym=i % 3 != 0, act=i % 5 in (1, 3),
                          dtype=dtype, cfg=cfg, bits=3 if i % 4 == 2 else 4))  # fmt: skip
    for c in cases:
        if not budget.left_until(share):
            rows.append({**_jsonable(c), "status": "skipped (budget)"})
            continue
        row = _jsonable(c)
        try:
            w = make_weight(c["n"], c["k"], bits=c["bits"], group_size=c["g"], sym=c["sym"], act_order=c["act"],
                            device=device)  # fmt: skip
            x = torch.randn(c["m"], c["k"], device=device).to(c["dtype"])
            bias = torch.randn(c["n"], device=device).to(c["dtype"])
            t = time.perf_counter()
            y = dequant_gemm(x, prepare_weight(w), bias, c["cfg"])
            _sync(device)
            row["first_call_s"] = round(time.perf_counter() - t, 3)
            ref = dequant_matmul_ref(x.float(), w, bias.float())
            err, ok, metric = error_of(y, ref, c["dtype"])
            row.update(error=err, metric=metric, status="ok" if ok else "FAIL")
        except Exception as e:  # report and go on: one broken config must not hide the others
            log.exception("correctness case %s", row)
            row.update(status=f"ERROR {type(e).__name__}: {str(e)[:300]}")
        rows.append(row)
    return rows


def compile_and_graph_checks(device, dry):
    """torch.compile through the custom op's fake implementation, and CUDA-graph capture."""
    out = {}
    st = prepare_weight(make_weight(256, 512, group_size=64, sym=False, act_order=True, device=device))
    dtype = torch.float32 if dry else torch.float16
    x = torch.randn(3, 512, device=device, dtype=dtype)
    ref = dequant_gemm(x, st)
    try:
        backend = "aot_eager" if dry else "inductor"
        f = torch.compile(lambda t: dequant_gemm(t, st) * 2, backend=backend, fullgraph=True)
        y = f(x)
        out["torch_compile"] = {"backend": backend, "ok": bool(torch.allclose(y, ref * 2, rtol=1e-3, atol=1e-3))}
    except Exception as e:
        log.exception("torch.compile check")
        out["torch_compile"] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    if device == "cuda":
        try:
            g = torch.cuda.CUDAGraph()
            xs = x.clone()
            dequant_gemm(xs, st)  # warm up (compile) outside the capture
            torch.cuda.synchronize()
            with torch.cuda.graph(g):
                yg = dequant_gemm(xs, st)
            xs.copy_(x * 0.5)
            g.replay()
            torch.cuda.synchronize()
            out["cuda_graph"] = {"ok": bool(torch.allclose(yg, dequant_gemm(x * 0.5, st), rtol=1e-3, atol=1e-3))}
        except Exception as e:
            log.exception("CUDA graph check")
            out["cuda_graph"] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    return out


def copy_bandwidth(device) -> float | None:
    if device != "cuda":
        return None
    import triton.testing

    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), return_mode="median")
    return 2 * a.numel() / (ms * 1e-3) / 1e9


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, graph: bool) -> float | None:
    if device != "cuda":  # dry run: wall clock, no graphs
        if graph:
            return None
        fn()
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return sorted(ts)[1] * 1e3
    import triton.testing

    fn()  # compile and load outside any graph capture
    torch.cuda.synchronize()
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def _copies(bytes_each: int, device) -> int:
    if device != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(2, min(64, math.ceil(3 * l2 / bytes_each)))


@functools.lru_cache(maxsize=4)
def _bench_weight(n, k, device, bits=4):
    return prepare_weight(make_weight(n, k, bits=bits, group_size=128, sym=True, device=device))


def bench_one(name, n, k, m, device, cfg=None, with_torch=True, graph_only=False, bits=4):
    row = {"shape": name, "M": m, "N": n, "K": k, "bits": bits}
    dtype = torch.float16 if device == "cuda" else torch.float32
    st0 = _bench_weight(n, k, device, bits)
    planes = [t for t in (st0.qweight_t, st0.qhigh_t, st0.scales_t) if t is not None]
    wbytes = sum(t.numel() * t.element_size() for t in planes)
    states = [st0] + [
        replace(st0, qweight_t=st0.qweight_t.clone(), scales_t=st0.scales_t.clone(),
                qhigh_t=None if st0.qhigh_t is None else st0.qhigh_t.clone())
        for _ in range(_copies(wbytes, device) - 1)
    ]
    x = torch.randn(m, k, device=device, dtype=dtype)
    io_bytes = (m * k + m * n) * x.element_size()
    cyc = itertools.cycle(states)
    fn = lambda: dequant_gemm(x, next(cyc), None, cfg)  # noqa: E731
    used = cfg or pick_config(m, n, k, 128, sm_count(device, 0 if device == "cuda" else None))
    row["cfg"] = used.to_list()
    row["weight_copies"] = len(states)
    if not graph_only:
        row["triton_eager_ms"] = time_ms(fn, device, graph=False)
    row["triton_graph_ms"] = time_ms(fn, device, graph=True)
    if cfg is None and bits == 4:  # the default config once more, its codes turned to floats by the magic-number trick
        cfg_m = replace(used, deq="magic")
        fn_m = lambda: dequant_gemm(x, next(cyc), None, cfg_m)  # noqa: E731
        row["triton_magic_graph_ms"] = time_ms(fn_m, device, graph=device == "cuda")
    t_ms = row["triton_graph_ms"] or row.get("triton_eager_ms")
    if t_ms:
        row["triton_GBps"] = (wbytes + io_bytes) / (t_ms * 1e-3) / 1e9
        row["triton_TFLOPs"] = 2 * m * n * k / (t_ms * 1e-3) / 1e12
    if with_torch:
        w16 = torch.randn(n, k, device=device, dtype=dtype)
        ws = [w16] + [w16.clone() for _ in range(_copies(w16.numel() * w16.element_size(), device) - 1)]
        cyc16 = itertools.cycle(ws)
        f16 = lambda: F.linear(x, next(cyc16))  # noqa: E731
        row["torch_eager_ms"] = time_ms(f16, device, graph=False)
        row["torch_graph_ms"] = time_ms(f16, device, graph=True)
        tt = row["torch_graph_ms"] or row["torch_eager_ms"]
        if tt and t_ms:
            row["speedup_vs_fp16"] = tt / t_ms
            row["torch_GBps"] = (n * k * 2 + io_bytes) / (tt * 1e-3) / 1e9
    return row


def bench(device, budget, dry, share):
    shapes = [("tiny", 96, 160), ("tiny2", 64, 576)] if dry else LLAMA_SHAPES + MODEL_SHAPES
    ms = [1, 4, 16] if dry else BENCH_MS
    rows = []
    for (name, n, k), m in itertools.product(shapes, ms):
        if not budget.left_until(share):
            rows.append({"shape": name, "M": m, "N": n, "K": k, "status": "skipped (budget)"})
            continue
        try:
            rows.append({**bench_one(name, n, k, m, device), "status": "ok"})
        except Exception as e:
            log.exception("bench %s M=%d", name, m)
            rows.append({"shape": name, "M": m, "N": n, "K": k, "status": f"ERROR {type(e).__name__}: {str(e)[:300]}"})
    return rows


def sweep_candidates(m, n, k, sms, wx_only=False):
    auto = pick_config(m, n, k, 128, sms)
    cands = {"auto": auto, "auto+magic": replace(auto, deq="magic"),
             "auto+gather": replace(auto, unpack="gather")}  # fmt: skip
    wx = replace(auto, operands="wx", unpack="reshape")
    cands["wx"] = wx
    cands["wx+magic"] = replace(wx, deq="magic")
    if m <= 16:
        cands["wx-bn32"] = replace(wx, block_n=32)
        cands["wx-bn128"] = replace(wx, block_n=128)
        cands["wx-bk64"] = replace(wx, block_k=64)
        cands["wx-split16"] = replace(wx, split_k=16)
        cands["wx-warps8"] = replace(wx, num_warps=8)
    else:
        cands["wx-128x128"] = TritonConfig(128, 128, 64, num_warps=8, num_stages=3, operands="wx")
        cands["wx-128x128xk128"] = TritonConfig(128, 128, 128, num_warps=8, num_stages=3, operands="wx")
        cands["wx-64x256"] = TritonConfig(64, 256, 64, num_warps=8, num_stages=3, operands="wx")
        cands["wx-128x256"] = TritonConfig(128, 256, 64, num_warps=8, num_stages=3, operands="wx")
    if wx_only:
        return cands
    if m <= 16:
        for s in (1, 4, 12, 16, 32):
            cands[f"split{s}"] = replace(auto, split_k=s)
        cands["split16+magic"] = replace(auto, split_k=16, deq="magic")
        cands["bn32"] = replace(auto, block_n=32)
        cands["bn32+magic"] = replace(auto, block_n=32, deq="magic")
        cands["bn128"] = replace(auto, block_n=128)
        cands["bk64"] = replace(auto, block_k=64)
        cands["warps2"] = replace(auto, num_warps=2)
        cands["stages2"] = replace(auto, num_stages=2)
    else:
        cands["64x128"] = TritonConfig(64, 128, 64, num_warps=4, num_stages=4)
        cands["128x128"] = TritonConfig(128, 128, 64, num_warps=8, num_stages=3)
        cands["128x128+magic"] = TritonConfig(128, 128, 64, num_warps=8, num_stages=3, deq="magic")
        cands["128x256"] = TritonConfig(128, 256, 64, num_warps=8, num_stages=3)
        cands["128x128xk128"] = TritonConfig(128, 128, 128, num_warps=8, num_stages=3)
        cands["128x128xk128+magic"] = TritonConfig(128, 128, 128, num_warps=8, num_stages=3, deq="magic")
        cands["128x128s4"] = TritonConfig(128, 128, 64, num_warps=8, num_stages=4)
    return cands


def _time_variants(rows, name, n, k, m, cands, device, budget, share, *, torch_for=None):
    """Time each labelled config of ``cands`` on one shape (graph time on CUDA); failures become rows."""
    for label, cfg in cands.items():
        if not budget.left_until(share):
            rows.append({"shape": name, "M": m, "variant": label, "status": "skipped (budget)"})
            continue
        try:
            r = bench_one(name, n, k, m, device, cfg=cfg, with_torch=label == torch_for, graph_only=device == "cuda")
            rows.append({**r, "variant": label, "status": "ok"})
        except Exception as e:
            log.exception("%s M=%d %s", name, m, label)
            rows.append({"shape": name, "M": m, "variant": label, "cfg": cfg.to_list(),
                         "status": f"ERROR {type(e).__name__}: {str(e)[:200]}"})  # fmt: skip


def sweep(device, budget, dry, share, wx_only=False):
    if dry:
        jobs = [("tiny", 96, 160, 1)]
    else:
        jobs = [("llama7b.qkvo", 4096, 4096, 1), ("llama7b.gate_up", 11008, 4096, 1),
                ("llama7b.down", 4096, 11008, 1), ("llama7b.qkvo", 4096, 4096, 256),
                ("llama7b.gate_up", 11008, 4096, 256), ("llama7b.qkvo", 4096, 4096, 16),
                ("smollm2.gate_up", 1536, 576, 1), ("gemma3.down", 640, 2048, 1), ("gemma3.k_v", 256, 640, 1)]  # fmt: skip
        if wx_only:
            jobs += [("llama7b.down", 4096, 11008, 256), ("llama7b.qkvo", 4096, 4096, 1024),
                     ("llama7b.gate_up", 11008, 4096, 1024), ("llama7b.gate_up", 11008, 4096, 16),
                     ("gemma3.gate_up", 2048, 640, 1), ("gemma3.gate_up", 2048, 640, 256)]  # fmt: skip
    sms = sm_count(device, 0 if device == "cuda" else None)
    rows = []
    for name, n, k, m in jobs:
        _time_variants(rows, name, n, k, m, sweep_candidates(m, n, k, sms, wx_only), device, budget, share)
    return rows


def lowbit(device, budget, dry, share):
    """Graph time of 2-, 3-, 4- and 8-bit layers (symmetric, G = 128, default config) on the
    Llama-7B shapes: whether fewer bits read are less time."""
    jobs = [("tiny", 96, 160)] if dry else LLAMA_SHAPES
    ms = [1] if dry else [1, 16, 256]
    rows = []
    for (name, n, k), m, bits in itertools.product(jobs, ms, (4, 2, 3, 8)):
        if not budget.left_until(share):
            rows.append({"shape": name, "M": m, "bits": bits, "status": "skipped (budget)"})
            continue
        try:
            r = bench_one(name, n, k, m, device, with_torch=False, graph_only=device == "cuda", bits=bits)
            rows.append({**r, "status": "ok"})
        except Exception as e:
            log.exception("lowbit %s M=%d bits=%d", name, m, bits)
            rows.append({"shape": name, "M": m, "bits": bits, "status": f"ERROR {type(e).__name__}: {str(e)[:200]}"})
    return rows


def prefill_candidates(m, n, k, sms):
    """Prefill tilings beyond ``sweep_candidates``: more programs in flight (smaller tiles, split K),
    pipeline depth, warps, band height; to tell a latency-bound program from a throughput-bound one."""
    auto = pick_config(m, n, k, 128, sms)
    c = {"auto": auto, "auto-noprefetch": replace(auto, prefetch=0)}
    for bm, bn, bk, w in ((64, 64, 64, 4), (32, 128, 64, 4), (64, 128, 128, 4), (64, 128, 64, 8), (128, 64, 64, 4),
                          (64, 256, 64, 8)):  # fmt: skip
        c[f"{bm}x{bn}xk{bk}w{w}"] = TritonConfig(bm, bn, bk, num_warps=w, num_stages=4)
    c["auto-s3"] = replace(auto, num_stages=3)
    c["auto-s5"] = replace(auto, num_stages=5)
    for sp in (2, 4):
        c[f"auto-split{sp}"] = replace(auto, split_k=sp)
        c[f"64x64-split{sp}"] = TritonConfig(64, 64, 64, split_k=sp, num_stages=4)
    for gm in (1, 4, 16):
        c[f"auto-gm{gm}"] = replace(auto, group_m=gm)
    c["auto-s2"] = replace(auto, num_stages=2)
    if m <= 16:  # decode: the split and tile neighbours of the default
        c = {"auto": auto, "auto-noprefetch": replace(auto, prefetch=0)}
        for sp in (4, 16):
            c[f"split{sp}"] = replace(auto, split_k=sp)
            c[f"split{sp}-noprefetch"] = replace(auto, split_k=sp, prefetch=0)
        c["bn32"] = replace(auto, block_n=32)
        c["bn128"] = replace(auto, block_n=128)
        c["magic"] = replace(auto, deq="magic")
        c["wx"] = replace(auto, operands="wx")
    return c


def tile_candidates(m, n, k, sms):
    """Second round (``--tiles``): more warps per tile and taller tiles, which the first sweep left out;
    the profile says one warp per scheduler cannot hide the dequantizing instructions' latency."""
    auto = pick_config(m, n, k, 128, sms)
    c = {"auto": auto}
    for bm, bn, bk, w, st in ((128, 64, 64, 8, 4), (128, 64, 128, 4, 3), (128, 64, 128, 8, 3), (256, 64, 64, 8, 3),
                              (128, 128, 64, 8, 4), (256, 128, 64, 8, 3), (128, 256, 64, 8, 3)):  # fmt: skip
        c[f"{bm}x{bn}xk{bk}w{w}s{st}"] = TritonConfig(bm, bn, bk, num_warps=w, num_stages=st, split_k=auto.split_k)
    return c


def prefill_sweep(device, budget, dry, share, tiles=False):
    if tiles:
        jobs = [("tiny", 96, 160, 32)] if dry else [
            ("llama7b.qkvo", 4096, 4096, 256), ("llama7b.down", 4096, 11008, 256), ("llama7b.gate_up", 11008, 4096, 256),
            ("llama7b.qkvo", 4096, 4096, 1024), ("llama7b.gate_up", 11008, 4096, 1024), ("gemma3.gate_up", 2048, 640, 256),
            ("gemma3.gate_up", 2048, 640, 1024),
        ]  # fmt: skip
    else:
        jobs = [("tiny", 96, 160, 32)] if dry else [
            ("llama7b.qkvo", 4096, 4096, 256), ("llama7b.qkvo", 4096, 4096, 1), ("llama7b.gate_up", 11008, 4096, 1),
            ("llama7b.down", 4096, 11008, 1), ("llama7b.gate_up", 11008, 4096, 256), ("llama7b.qkvo", 4096, 4096, 1024),
            ("gemma3.gate_up", 2048, 640, 1), ("gemma3.gate_up", 2048, 640, 256),
        ]  # fmt: skip
    sms = sm_count(device, 0 if device == "cuda" else None)
    rows = []
    for name, n, k, m in jobs:
        cands = (tile_candidates if tiles else prefill_candidates)(m, n, k, sms)
        if dry:
            cands = dict(itertools.islice(cands.items(), 3))
        _time_variants(rows, name, n, k, m, cands, device, budget, share, torch_for="auto")
    return rows


def heuristic_check(device, budget, dry, share):
    """The default config against the one it replaced and a K split, at prefill sizes around it."""
    jobs = [("tiny", 96, 160, 128)] if dry else [
        (name, n, k, m) for m in (128, 256, 512) for name, n, k in
        (("llama7b.qkvo", 4096, 4096), ("llama7b.down", 4096, 11008), ("gemma3.gate_up", 2048, 640),
         ("smollm2.gate_up", 1536, 576))
    ]  # fmt: skip
    sms = sm_count(device, 0 if device == "cuda" else None)
    rows = []
    for name, n, k, m in jobs:
        auto = pick_config(m, n, k, 128, sms)
        cands = {"auto": auto, "64x128": TritonConfig(64, 128, 64, num_warps=4, num_stages=4),
                 "auto-split1": replace(auto, split_k=1), "auto-split2": replace(auto, split_k=2)}  # fmt: skip
        _time_variants(rows, name, n, k, m, cands, device, budget, share, torch_for="auto")
    return rows


def profile_one(spec: str, device: str) -> int:
    parts = spec.split(",")
    n, k, m = (int(v) for v in parts[:3])
    bits = int(parts[3]) if len(parts) > 3 else 4
    cfg = TritonConfig.from_list([int(v) for v in parts[4].split(":")]) if len(parts) > 4 else None
    st = prepare_weight(make_weight(n, k, bits=bits, group_size=128, device=device))
    dtype = torch.float16 if device == "cuda" else torch.float32
    x = torch.randn(m, k, device=device, dtype=dtype)
    for _ in range(20):
        dequant_gemm(x, st, None, cfg)
    _sync(device)
    used = cfg or pick_config(m, n, k, 128, sm_count(device, 0 if device == "cuda" else None))
    print(f"profiled N={n} K={k} M={m} bits={bits} cfg={used.to_list()}")
    return 0


def _jsonable(c):
    return {k: (str(v) if isinstance(v, torch.dtype) else (v.to_list() if isinstance(v, TritonConfig) else v))
            for k, v in c.items()}  # fmt: skip


def machine_info(device):
    import triton

    info = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "host": platform.node(), "cpus": os.cpu_count(), "device": device}  # fmt: skip
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sms=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                    memory_GiB=round(p.total_memory / 2**30, 1), l2_MiB=getattr(p, "L2_cache_size", 0) / 2**20)  # fmt: skip
    return info


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_tables(result):
    c = result["correctness"]
    fails = [r for r in c if r["status"] not in ("ok",) and not r["status"].startswith("skipped")]
    print(f"\ncorrectness: {sum(r['status'] == 'ok' for r in c)} ok, {len(fails)} failed, "
          f"{sum(r['status'].startswith('skipped') for r in c)} skipped of {len(c)}")  # fmt: skip
    for r in fails[:10]:
        print("  FAIL", {k: r.get(k) for k in ("m", "n", "k", "g", "sym", "act", "dtype", "cfg", "error", "status")})
    print("checks:", json.dumps(result["checks"]))
    print(f"copy bandwidth: {_fmt(result['copy_GBps'], '.0f')} GB/s (read + write)")
    print("\nspeed (4-bit sym G=128, fp16 activations; median ms; graph = CUDA-graph replay)")
    print(f"{'shape':17s} {'M':>4s} {'N':>6s} {'K':>6s} {'tri eager':>9s} {'tri graph':>9s} {'magic':>7s} "
          f"{'fp16 eager':>10s} {'fp16 graph':>10s} {'speedup':>7s} {'tri GB/s':>8s} {'of copy':>7s}  cfg")  # fmt: skip
    copy_bw = result["copy_GBps"]
    for r in result["bench"]:
        if r["status"] != "ok":
            print(f"{r['shape']:17s} {r['M']:>4d} {r['N']:>6d} {r['K']:>6d}  {r['status']}")
            continue
        print(f"{r['shape']:17s} {r['M']:>4d} {r['N']:>6d} {r['K']:>6d} {_fmt(r.get('triton_eager_ms'), '9.4f')} "
              f"{_fmt(r.get('triton_graph_ms'), '9.4f')} {_fmt(r.get('triton_magic_graph_ms'), '7.4f')} "
              f"{_fmt(r.get('torch_eager_ms'), '10.4f')} "
              f"{_fmt(r.get('torch_graph_ms'), '10.4f')} {_fmt(r.get('speedup_vs_fp16'), '7.2f')} "
              f"{_fmt(r.get('triton_GBps'), '8.0f')} "
              f"{_fmt(r['triton_GBps'] / copy_bw if copy_bw and r.get('triton_GBps') else None, '7.0%')}  {r['cfg']}")  # fmt: skip
    print("\nsweep (graph median ms; best per shape marked *)")
    by = {}
    for r in result["sweep"]:
        by.setdefault((r["shape"], r["M"]), []).append(r)
    for (shape, m), rs in by.items():
        ok = [r for r in rs if r["status"] == "ok"]
        best = min(ok, key=lambda r: r["triton_graph_ms"] or r["triton_eager_ms"]) if ok else None
        cells = []
        for r in rs:
            t = (r.get("triton_graph_ms") or r.get("triton_eager_ms")) if r["status"] == "ok" else None
            cells.append(f"{r['variant']}={_fmt(t, '.4f')}{'*' if r is best else ''}"
                         if r["status"] == "ok" or r["status"].startswith("skipped") else f"{r['variant']}=ERR")  # fmt: skip
        print(f"{shape} M={m}: " + "  ".join(cells))
    if result.get("lowbit"):
        print("\nlow-bit layers (sym G=128, default config, fp16 activations; graph median ms; ratio to 4-bit)")
        four = {(r["shape"], r["M"]): r.get("triton_graph_ms") for r in result["lowbit"]
                if r["status"] == "ok" and r["bits"] == 4}  # fmt: skip
        for r in result["lowbit"]:
            t = r.get("triton_graph_ms") if r["status"] == "ok" else None
            base = four.get((r["shape"], r["M"]))
            print(f"{r['shape']:17s} M={r['M']:<5d} {r['bits']}-bit {_fmt(t, '9.4f')} ms  "
                  f"x{_fmt(t / base if t and base else None, '.2f')}  {_fmt(r.get('triton_GBps'), '.0f')} GB/s  "
                  f"{r['status'] if r['status'] != 'ok' else r['cfg']}")  # fmt: skip
    for key, title in (("prefill", "prefill sweep"), ("heuristic", "default prefill config against its neighbours")):
        if not result.get(key):
            continue
        print(f"\n{title} (graph median ms; fp16 = cuBLAS on the same shape)")
        for r in result[key]:
            t = r.get("triton_graph_ms") if r["status"] == "ok" else None
            extra = f"  fp16 {_fmt(r.get('torch_graph_ms'), '.4f')}" if r.get("torch_graph_ms") else ""
            print(f"{r['shape']:17s} M={r['M']:<5d} {r['variant']:24s} {_fmt(t, '9.4f')} "
                  f"{_fmt(r.get('triton_TFLOPs'), '6.0f')} TFLOP/s  {r.get('cfg')}{extra}"
                  f"{'' if r['status'] == 'ok' else '  ' + r['status']}")  # fmt: skip
    print(f"\ntotal {result['elapsed_s']:.0f} s")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write all results here (required unless --profile)")
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop starting new work after this")
    ap.add_argument("--dry-run", action="store_true", help="CPU with TRITON_INTERPRET=1, tiny shapes")
    ap.add_argument("--profile", metavar="N,K,M[,BITS[,CFG]]", help="run one product 20 times, for a profiler")
    ap.add_argument("--lowbit", action="store_true", help="also time 2/3/8-bit layers against 4-bit")
    ap.add_argument("--tiles", action="store_true", help="with --prefill-sweep: the second round (warps, taller tiles)")
    ap.add_argument("--heuristic", action="store_true",
                    help="instead of the config sweep, the default prefill config against its neighbours")
    ap.add_argument("--prefill-sweep", action="store_true",
                    help="no speed table or decode sweep; sweep prefill tilings (and --lowbit if given)")
    ap.add_argument("--wx-sweep", action="store_true",
                    help='no speed table; sweep the default config against operands="wx" variants, more shapes')
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device (use --dry-run with TRITON_INTERPRET=1 on a CPU)")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--dry-run needs TRITON_INTERPRET=1 in the environment")
    if args.profile:
        return profile_one(args.profile, device)
    if not args.json:
        ap.error("--json is required")
    budget = Budget(args.budget_s)
    result = {"machine": machine_info(device), "protocol": __doc__}
    result["copy_GBps"] = copy_bandwidth(device)
    result["correctness"] = correctness(device, budget, args.dry_run, share=0.27 if args.prefill_sweep else 0.35)
    result["checks"] = compile_and_graph_checks(device, args.dry_run)
    if args.prefill_sweep:
        result["bench"], result["sweep"] = [], []
        result["lowbit"] = lowbit(device, budget, args.dry_run, share=0.45) if args.lowbit else []
        result["prefill"] = prefill_sweep(device, budget, args.dry_run, share=1.0, tiles=args.tiles)
    else:
        result["bench"] = [] if args.wx_sweep else bench(device, budget, args.dry_run, share=0.65 if args.lowbit else 0.75)
        result["lowbit"] = lowbit(device, budget, args.dry_run, share=0.8) if args.lowbit else []
        if args.heuristic:
            result["sweep"] = []
            result["heuristic"] = heuristic_check(device, budget, args.dry_run, share=1.0)
        else:
            result["sweep"] = sweep(device, budget, args.dry_run, share=1.0, wx_only=args.wx_sweep)
    result["elapsed_s"] = budget.elapsed()
    Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    print_tables(result)
    bad = [r for r in result["correctness"] if r["status"] not in ("ok",) and not r["status"].startswith("skipped")]
    return 1 if bad or not all(v.get("ok") for v in result["checks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
