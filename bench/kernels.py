"""Benchmark of the CPU INT4 dequant-GEMM kernel (issue 4) against the alternatives, in one run.

For each layer shape (the default models' linear layers, plus 4096x4096 and 11008x4096), each M
(tokens) and each thread count it times, as the median of repeated calls, in ``--rounds`` interleaved
rounds (every method once per round; reported: the median over rounds of times and of per-round
ratios, so that a slow spell of a shared machine does not bias a comparison):

* ours:   ``cpu_linear`` on an RTN INT4 g128 symmetric layer, with fp32 and with bf16 activations,
  and with fp32 activations under ``torch.set_float32_matmul_precision("medium")`` ("f32 med":
  the user allows bf16 math for fp32 matmuls, so the kernel rounds x to bf16 and runs the bf16 code);
  at M = 1 also with fp32 activations on the FMA GEMV ("f32 fma", ``LLMQUANT_CPU_FP32_GEMV=fma``)
  instead of the default integer one; and with dynamic INT8 activations ("a8",
  :mod:`llmquant.kernels.act_int8`);
* fp32 / bf16 ``F.linear`` on the float weight (what a float model does);
* torch's own CPU int4 path (``aten._weight_int4pack_mm_for_cpu``; it needs K % 128 == 0, so it is
  missing for K = 576), with fp32 and bf16 activations;
* naive: dequantize the whole weight, then ``F.linear`` (the reference kernel).

It also measures the machine's memory bandwidth (a large tensor sum, and a copy) with the same
thread counts (the header), and in every round of a cold case the read bandwidth of the weight copies
themselves (:func:`copies_read_GBps`), so that decode results can be read as a fraction of the
roofline of the memory they come from. Decode sizes
(M <= 4) are timed "cold" (every call uses the next of several copies of the weights, together
larger than the last-level cache, so weights come from DRAM as in a real decode step) and "hot"
(the same weights every call). Larger M is timed hot only (compute-bound).

    python bench/kernels.py --quick                    # a minute or so
    python bench/kernels.py --json out/kernels.json    # everything (tens of minutes)

Speeds carry their protocol: shapes N x K, M, activation dtype, threads, cold/hot, machine (the
table header prints the command, CPU, its vector features, the instruction set the kernels ran, torch
version, load average). ``--isa avx2`` runs everything as on an AVX2-only CPU (bench/machine.py).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time

import torch
from machine import SIMULATE, header, machine_info, simulate_isa
import torch.nn.functional as F

from llmquant.config import LayerQuant
from llmquant.formats.packing import unpack_rows
from llmquant.kernels import cpu_native, dequant_matmul_ref
from llmquant.kernels.cpu import cpu_linear
from llmquant.kernels.cpu_layout import CpuLayout, repack
from llmquant.quantizers.rtn import quantize_weight_rtn

G = 128
SHAPES = [  # (model, layer, N, K)
    ("gemma3-270m", "q_proj", 1024, 640),
    ("gemma3-270m", "k_proj", 256, 640),
    ("gemma3-270m", "o_proj", 640, 1024),
    ("gemma3-270m", "gate_proj", 2048, 640),
    ("gemma3-270m", "down_proj", 640, 2048),
    ("gemma3-270m", "lm_head", 262144, 640),
    ("smollm2-135m", "q_proj", 576, 576),
    ("smollm2-135m", "k_proj", 192, 576),
    ("smollm2-135m", "gate_proj", 1536, 576),
    ("smollm2-135m", "down_proj", 576, 1536),
    ("llama-7b", "4096x4096", 4096, 4096),
    ("llama-7b", "11008x4096", 11008, 4096),
]
QUICK_SHAPES = {("gemma3-270m", "gate_proj"), ("smollm2-135m", "down_proj"), ("llama-7b", "4096x4096")}
COLD_MAX_M = 4


def llc_bytes() -> int:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            s = f.read().strip()
        return int(s[:-1]) * {"K": 1 << 10, "M": 1 << 20}[s[-1]]
    except (OSError, ValueError, KeyError):
        return 32 << 20




def timeit(fn, ncopies: int, min_time: float, min_reps: int = 5, max_reps: int = 200) -> float:
    """Median seconds of fn(i), i cycling over ncopies weight copies (fewer repetitions for calls
    that take seconds: torch's int4 path with fp32 activations is that slow at large M)."""
    t0 = time.perf_counter()
    fn(0)
    first = time.perf_counter() - t0
    if first > 2.0:
        min_reps = 1
    elif first > 0.5:
        min_reps = min(min_reps, 3)
    times, spent, i = [], 0.0, 0
    while (spent < min_time or len(times) < min_reps) and len(times) < max_reps:
        i = (i + 1) % ncopies
        t0 = time.perf_counter()
        fn(i)
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
    return statistics.median(times)


@functools.cache
def _bandwidth_buffers() -> tuple[torch.Tensor, torch.Tensor]:
    # allocated and touched once: cold cases re-measure the bandwidth in every round
    a = torch.ones(128 << 20)
    return a, torch.zeros_like(a)


def bandwidth(threads: int, min_time: float) -> dict:
    """Read (sum) and copy bandwidth of a 512 MiB fp32 tensor, GB/s (the machine's, for the header)."""
    torch.set_num_threads(threads)
    a, b = _bandwidth_buffers()
    t_sum = timeit(lambda i: a.sum(), 1, min_time, min_reps=5, max_reps=20)
    t_copy = timeit(lambda i: b.copy_(a), 1, min_time, min_reps=5, max_reps=20)
    return {"read_GBps": a.numel() * 4 / t_sum / 1e9, "copy_GBps": 2 * a.numel() * 4 / t_copy / 1e9}


def copies_read_GBps(copies: list[torch.Tensor], threads: int, min_time: float = 0.05) -> float:
    """Read bandwidth of the very bytes a cold case reads, GB/s: a max over each copy in turn (as 32-bit
    integers: hot, it runs at 2-3x a DRAM's speed), cycling as the timed calls do. A separate buffer's
    bandwidth is not the weights' where memory is not uniform: on the 2-core Xeon VM of bench/results the
    512 MiB buffer read at 24 GB/s and, in another process, at 30 GB/s, with the kernel's speed on the
    weight copies moving alike; a run whose buffer and copies landed apart reported 88% of the buffer's
    bandwidth where the copies' own gave 66%."""
    torch.set_num_threads(threads)
    views = [c.view(torch.uint8).reshape(-1) for c in copies]
    views = [v[: v.numel() // 4 * 4].view(torch.int32) for v in views]
    t = timeit(lambda i: views[i].max(), len(views), min_time, min_reps=len(views), max_reps=4 * len(views))
    return statistics.median(v.numel() * 4 for v in views) / t / 1e9


class Layer:
    """One shape: the float weight, our layout, torch's int4 packing, in as many copies as cold timing needs."""

    def __init__(self, n: int, k: int, ncopies_for) -> None:
        torch.manual_seed(0)
        w = torch.randn(n, k) * 0.02
        self.packed = quantize_weight_rtn(w, LayerQuant(4, G, True))
        self.layout = repack(self.packed)
        wq = dequant_matmul_ref(torch.eye(k), self.packed).T.contiguous()  # the dequantized weight [N, K]
        self.w32 = [wq] + [wq.clone() for _ in range(ncopies_for(wq) - 1)]
        w16 = wq.to(torch.bfloat16)
        self.w16 = [w16] + [w16.clone() for _ in range(ncopies_for(w16) - 1)]
        lay = self.layout
        self.lays = [lay] + [
            CpuLayout(lay.qdata.clone(), lay.scales.clone(), None, None, 4, k, n, G)
            for _ in range(ncopies_for(lay.qdata) - 1)
        ]
        self.int4 = None
        if k % G == 0:
            codes = unpack_rows(self.packed.qweight, 4, k).to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            s = self.packed.scales.to(torch.float32).T  # [NG, N]
            sz = torch.stack((s, torch.zeros_like(s)), dim=-1)  # w = (q - 8) * scale + zero
            self.int4 = [(packed, sz.to(dt).contiguous()) for dt in (torch.float32, torch.bfloat16)]
            self.int4_copies = [packed] + [packed.clone() for _ in range(ncopies_for(packed) - 1)]

    def weight_bytes(self) -> int:
        return self.layout.nbytes()


def run_case(layer: Layer, m: int, cold: bool, min_time: float, naive: bool) -> dict:
    k = layer.layout.in_features
    x32 = torch.randn(m, k)
    x16 = x32.to(torch.bfloat16)
    nc = (lambda lst: len(lst)) if cold else (lambda lst: 1)
    t = {
        "ours_fp32": timeit(lambda i: cpu_linear(x32, layer.lays[i]), nc(layer.lays), min_time),
        "ours_bf16": timeit(lambda i: cpu_linear(x16, layer.lays[i]), nc(layer.lays), min_time),
        "ours_fp32_medium": _medium(lambda: timeit(lambda i: cpu_linear(x32, layer.lays[i]), nc(layer.lays), min_time)),
        "ours_a8": timeit(lambda i: cpu_linear(x32, layer.lays[i], act_int8=True), nc(layer.lays), min_time),
        "fp32_linear": timeit(lambda i: F.linear(x32, layer.w32[i]), nc(layer.w32), min_time),
        "bf16_linear": timeit(lambda i: F.linear(x16, layer.w16[i]), nc(layer.w16), min_time),
    }
    if m == 1:
        t["ours_fp32_fma"] = _fma_gemv(lambda: timeit(lambda i: cpu_linear(x32, layer.lays[i]), nc(layer.lays), min_time))
    if layer.int4 is not None:
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        (_, sz32), (_, sz16) = layer.int4
        cp = layer.int4_copies
        t["int4_fp32"] = timeit(lambda i: mm(x32, cp[i], G, sz32), nc(cp), min_time)
        t["int4_bf16"] = timeit(lambda i: mm(x16, cp[i], G, sz16), nc(cp), min_time)
    if naive:
        t["naive"] = timeit(lambda i: dequant_matmul_ref(x32, layer.packed), 1, min_time, min_reps=3, max_reps=20)
    return t


def _medium(fn):
    """fn() under torch.set_float32_matmul_precision("medium"): the user's opt-in to bf16 math for
    fp32 matmuls, which the CPU kernel honours (x rounded to bf16, the bf16 kernels)."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        return fn()
    finally:
        torch.set_float32_matmul_precision(saved)


def _fma_gemv(fn):
    """fn() with fp32 decode on the FMA GEMV (LLMQUANT_CPU_FP32_GEMV=fma) rather than the VNNI one."""
    saved = os.environ.get("LLMQUANT_CPU_FP32_GEMV")
    os.environ["LLMQUANT_CPU_FP32_GEMV"] = "fma"
    try:
        return fn()
    finally:
        if saved is None:
            del os.environ["LLMQUANT_CPU_FP32_GEMV"]
        else:
            os.environ["LLMQUANT_CPU_FP32_GEMV"] = saved


def ratios(t: dict) -> dict:
    r = {
        "fp32_linear/ours_fp32": t["fp32_linear"] / t["ours_fp32"],
        "fp32_linear/ours_bf16": t["fp32_linear"] / t["ours_bf16"],
        "fp32_linear/ours_fp32_medium": t["fp32_linear"] / t["ours_fp32_medium"],
        "fp32_linear/ours_a8": t["fp32_linear"] / t["ours_a8"],
        "bf16_linear/ours_bf16": t["bf16_linear"] / t["ours_bf16"],
    }
    if "int4_bf16" in t:
        r["int4_bf16/ours_bf16"] = t["int4_bf16"] / t["ours_bf16"]
        r["int4_fp32/ours_fp32"] = t["int4_fp32"] / t["ours_fp32"]
    if "naive" in t:
        r["naive/ours_fp32"] = t["naive"] / t["ours_fp32"]
    r["ours_fp32/ours_bf16"] = t["ours_fp32"] / t["ours_bf16"]
    r["ours_fp32_medium/ours_bf16"] = t["ours_fp32_medium"] / t["ours_bf16"]
    if "ours_fp32_fma" in t:
        r["ours_fp32_fma/ours_bf16"] = t["ours_fp32_fma"] / t["ours_bf16"]
    return r


def run_rounds(layer: Layer, m: int, cold: bool, min_time: float, naive: bool, rounds: int, threads: int,
               bw_start: float) -> dict:
    """``rounds`` interleaved repetitions of one case: every method is timed once per round, and the
    ratios (and, for cold cases, the bandwidth, re-measured in each round) are taken per round, then
    the median over rounds is reported. A slow spell of the machine (a noisy neighbour on a VM) then
    hits the methods of one round alike instead of biasing a ratio."""
    per = []
    for i in range(rounds):
        t = run_case(layer, m, cold, min_time, naive=naive and i == 0)
        read = copies_read_GBps([lay.qdata for lay in layer.lays], threads) if cold else bw_start
        gbps = {dt: layer.weight_bytes() / t[f"ours_{dt}"] / 1e9 for dt in ("fp32", "bf16")}
        per.append((t, ratios(t), read, {dt: g / read for dt, g in gbps.items()}))
    med = statistics.median
    t = {k: med([p[0][k] for p in per if k in p[0]]) for k in per[0][0]}
    r = {k: med([p[1][k] for p in per if k in p[1]]) for k in per[0][1]}
    frac = {dt: med([p[3][dt] for p in per]) for dt in ("fp32", "bf16")}
    gbps = {dt: layer.weight_bytes() / t[f"ours_{dt}"] / 1e9 for dt in ("fp32", "bf16")}
    return {"times_s": t, "ratios": r, "ours_GBps": gbps, "frac_read_bw_by_dtype": frac,
            "frac_read_bw": max(frac.values()), "read_GBps": med([p[2] for p in per]), "rounds": rounds}


def fmt_ratio(r: dict, key: str) -> str:
    return f"{r[key]:6.2f}" if key in r else "   n/a"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 shapes, M in {1, 64}, short timing")
    ap.add_argument("--json", metavar="FILE", help="write every number here")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--m", default=None, help="comma-separated M values (default 1,4,16,64,256)")
    ap.add_argument("--shapes", default=None, help="comma-separated layer names or N x K (default: all)")
    ap.add_argument("--min-time", type=float, default=None, help="seconds of calls per measurement")
    ap.add_argument("--no-naive", action="store_true", help="skip the slow dequantize-then-matmul baseline")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of each case (median)")
    ap.add_argument("--isa", choices=sorted(SIMULATE), help="run as on a CPU with only this instruction set "
                    "(caps llmquant, MKL, oneDNN and ATen alike; see bench/machine.py)")
    args = ap.parse_args(argv)
    simulate_isa(args.isa)

    native, why = cpu_native.load()
    if native is None:
        print(f"native CPU library unavailable: {why}", file=sys.stderr)
        return 1
    threads = [int(v) for v in args.threads.split(",")]
    ms = [int(v) for v in (args.m or ("1,64" if args.quick else "1,4,16,64,256")).split(",")]
    min_time = args.min_time if args.min_time is not None else (0.05 if args.quick else 0.3)
    shapes = [s for s in SHAPES if not args.quick or (s[0], s[1]) in QUICK_SHAPES]
    if args.shapes:
        want = set(args.shapes.split(","))
        shapes = [s for s in shapes if s[1] in want or f"{s[2]}x{s[3]}" in want or f"{s[0]}/{s[1]}" in want]
    llc = llc_bytes()
    budget = 1 << 30  # bytes of copies per method, at most

    def ncopies_for(t: torch.Tensor) -> int:
        nbytes = t.numel() * t.element_size()
        return max(1, min(math.ceil(3 * llc / nbytes), budget // nbytes))

    machine = machine_info() | {"llc_bytes": llc}
    print(header(machine) + f"; LLC {llc >> 20} MiB")
    bw = {}
    for th in threads:
        bw[th] = bandwidth(th, min_time)
        print(f"# memory bandwidth, {th} thread(s): read {bw[th]['read_GBps']:.1f} GB/s, copy {bw[th]['copy_GBps']:.1f} GB/s")
    print("# INT4 g128 sym RTN; times: median ms; a8: dynamic INT8 activations (fp32 x); GB/s: our weight bytes "
          "(codes + scales) / time, fp32|bf16 activations; %BW: the better of the two, of the read bandwidth of the "
          "same weight copies (cold rows; measured in every round); "
          "ratios: their time / ours (> 1: ours faster)")
    head = (f"{'model/layer':26s} {'N x K':>12s} {'M':>4s} {'thr':>3s} {'mode':4s} {'ours f32':>9s} {'ours bf16':>9s} "
            f"{'f32 med':>8s} {'f32 fma':>8s} {'ours a8':>8s} {'GB/s f32|bf16':>13s} {'%BW':>4s} {'f32lin/':>7s} "
            f"{'f32lin/a8':>9s} {'bf16lin/':>8s} {'int4bf/':>7s} {'int4f32/':>8s} {'naive/':>7s}")  # fmt: skip
    print(head)
    results = []
    for model, name, n, k in shapes:
        layer = Layer(n, k, ncopies_for)
        for th in threads:
            torch.set_num_threads(th)
            for m in ms:
                for mode in ("cold", "hot") if m <= COLD_MAX_M else ("hot",):
                    res = run_rounds(layer, m, mode == "cold", min_time, not args.no_naive and mode == "hot",
                                     args.rounds, th, bw[th]["read_GBps"])
                    t, r, gbps, frac = res["times_s"], res["ratios"], res["ours_GBps"], res["frac_read_bw"]
                    results.append({
                        "model": model, "layer": name, "N": n, "K": k, "M": m, "threads": th, "mode": mode,
                        "weight_bytes": layer.weight_bytes(), **res,
                    })  # fmt: skip
                    print(f"{model + '/' + name:26s} {f'{n}x{k}':>12s} {m:4d} {th:3d} {mode:4s} "
                          f"{t['ours_fp32'] * 1e3:9.3f} {t['ours_bf16'] * 1e3:9.3f} {t['ours_fp32_medium'] * 1e3:8.3f} "
                          f"{t['ours_fp32_fma'] * 1e3 if 'ours_fp32_fma' in t else float('nan'):8.3f} "
                          f"{t['ours_a8'] * 1e3:8.3f} "
                          f"{gbps['fp32']:6.1f}|{gbps['bf16']:<6.1f} {100 * frac:4.0f} "
                          f"{fmt_ratio(r, 'fp32_linear/ours_fp32'):>7s} {fmt_ratio(r, 'fp32_linear/ours_a8'):>9s} "
                          f"{fmt_ratio(r, 'bf16_linear/ours_bf16'):>8s} "
                          f"{fmt_ratio(r, 'int4_bf16/ours_bf16'):>7s} {fmt_ratio(r, 'int4_fp32/ours_fp32'):>8s} "
                          f"{fmt_ratio(r, 'naive/ours_fp32'):>7s}", flush=True)  # fmt: skip
        del layer
    targets = check_targets(results)
    for line in targets["lines"]:
        print(line)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "bandwidth": bw, "results": results, "targets": targets}, f, indent=1)
    return 0


def check_targets(results: list[dict]) -> dict:
    """The issue's targets, where this run measured the cases they name."""
    lines, out = ["# targets (4096x4096 INT4 g128)"], {}

    def find(m, th, mode):
        for r in results:
            if (r["N"], r["K"], r["M"], r["threads"], r["mode"]) == (4096, 4096, m, th, mode):
                return r
        return None

    d = find(1, 2, "cold")
    if d:
        r = d["ratios"]
        out["decode_frac_bw"] = d["frac_read_bw_by_dtype"]
        lines.append("  M=1 cold 2 threads: " + ", ".join(
            f"{dt} acts {100 * f:.0f}%" for dt, f in out["decode_frac_bw"].items()) + " of read bandwidth (target >= 80%)")
        if "int4_bf16/ours_bf16" in r:
            out["decode_vs_int4_bf16"] = r["int4_bf16/ours_bf16"]
            lines.append(f"  M=1 cold 2 threads: {r['int4_bf16/ours_bf16']:.2f}x torch int4 with bf16 acts (target >= 1.2)")
        out["decode_fp32_vs_bf16"] = 1 / r["ours_fp32/ours_bf16"]
        out["decode_fp32_medium_vs_bf16"] = 1 / r["ours_fp32_medium/ours_bf16"]
        fma = ""
        if "ours_fp32_fma/ours_bf16" in r:
            out["decode_fp32_fma_vs_bf16"] = 1 / r["ours_fp32_fma/ours_bf16"]
            fma = f", {out['decode_fp32_fma_vs_bf16']:.2f}x on the FMA GEMV"
        lines.append(f"  M=1 cold 2 threads: fp32 acts {out['decode_fp32_vs_bf16']:.2f}x the speed of bf16 acts "
                     f"(target ~1; {out['decode_fp32_medium_vs_bf16']:.2f}x with matmul precision 'medium'{fma})")
    for m in (128, 256):
        d = find(m, 2, "hot")
        if d:
            r = d["ratios"]
            out[f"M{m}_vs_fp32_linear"] = {"bf16": r["fp32_linear/ours_bf16"], "fp32": r["fp32_linear/ours_fp32"],
                                           "fp32_medium": r["fp32_linear/ours_fp32_medium"],
                                           "int8_acts": r["fp32_linear/ours_a8"]}
            lines.append(f"  M={m} 2 threads: {r['fp32_linear/ours_a8']:.2f}x (dynamic INT8 acts, target >= 1.5) / "
                         f"{r['fp32_linear/ours_fp32']:.2f}x (exact fp32, target >= 1.1) / "
                         f"{r['fp32_linear/ours_bf16']:.2f}x (bf16 acts) / {r['fp32_linear/ours_fp32_medium']:.2f}x "
                         "(fp32 acts, matmul precision 'medium') fp32 F.linear")  # fmt: skip
    if len(lines) == 1:
        lines.append("  (not measured in this run: needs 4096x4096 with 2 threads)")
    out["lines"] = lines
    return out


if __name__ == "__main__":
    sys.exit(main())
