"""Benchmark of the CPU kernel's bit widths: 2-, 3-, 4- and 8-bit layers of one shape, in one run.

2- and 3-bit layers are stored packed (2 or 3 bits a weight in memory) and expanded to the 4-bit
layout a few tiles at a time, in cache, before the 4-bit code runs on them (kernels/csrc/lq_cpu.h).
Decode reads the packed bytes, so at M = 1 a low-bit layer should take about its share of the
4-bit layer's time where the 4-bit GEMV is memory-bound, and no less than the 4-bit compute time.

For each shape, M, thread count and activation dtype it times RTN g128 symmetric layers of every
width as the median of repeated calls, "cold" at M <= 4 (each call uses the next of several weight
copies, together larger than the last-level cache) and hot otherwise, in ``--rounds`` interleaved
rounds (every width once per round; reported: medians over rounds of the times and of the per-round
ratios to the 4-bit time). Cold rows give their speed as a share of the read bandwidth of their own weight
copies (``kernels.copies_read_GBps``), measured in every round. ``--hot`` times M <= 4 hot as well (one
copy, in cache): the compute-bound time, the floor of the cold one, where a low-bit layer pays for its
unpacking on top of the 4-bit work.

    python bench/lowbit.py                        # a few minutes
    python bench/lowbit.py --isa avx2 --json bench/results/lowbit-<machine>-avx2.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
from kernels import copies_read_GBps, llc_bytes, timeit
from machine import SIMULATE, header, machine_info, simulate_isa

from llmquant.config import LayerQuant
from llmquant.kernels.cpu import cpu_linear
from llmquant.kernels.cpu_layout import CpuLayout, repack
from llmquant.quantizers.rtn import quantize_weight_rtn

G = 128
BITS = (8, 4, 3, 2)
SHAPES = {  # name: (N, K)
    "4096x4096": (4096, 4096),
    "11008x4096": (11008, 4096),
    "gemma3-270m gate_proj": (2048, 640),
    "gemma3-270m down_proj": (640, 2048),
}
COLD_MAX_M = 4
# activation modes timed: fp32 and bf16 (exact, lq_cpu.h), and fp32 with dynamic INT8 activations (opt-in)
MODES = ((torch.float32, False), (torch.bfloat16, False), (torch.float32, True))


def layouts(n: int, k: int, bits: int, copies: bool) -> list[CpuLayout]:
    """An RTN layer of the given width, and (for cold timing) copies of it that fill the last-level cache 3 times."""
    torch.manual_seed(0)
    lay = repack(quantize_weight_rtn(torch.randn(n, k) * 0.02, LayerQuant(bits, G, True)))
    ncopies = max(2, -(-3 * llc_bytes() // lay.nbytes())) if copies else 1
    return [lay] + [
        CpuLayout(lay.qdata.clone(), lay.scales.clone(), None, None, bits, k, n, G) for _ in range(ncopies - 1)
    ]


def run_shape(name: str, n: int, k: int, ms: list[int], threads: list[int], rounds: int, min_time: float,
              hot: bool = False) -> list[dict]:
    cold_needed = any(m <= COLD_MAX_M for m in ms)
    lays = {b: layouts(n, k, b, cold_needed) for b in BITS}
    rows = []
    for th in threads:
        torch.set_num_threads(th)
        for m, cold in [(m, c) for m in ms for c in ((True, False) if hot and m <= COLD_MAX_M else (m <= COLD_MAX_M,))]:
            for dt, a8 in MODES:
                x = torch.randn(m, k).to(dt)
                per = []
                for _ in range(rounds):
                    t, read = {}, {}
                    for b in BITS:
                        ls = lays[b] if cold else lays[b][:1]
                        t[b] = timeit(lambda i: cpu_linear(x, ls[i], act_int8=a8), len(ls), min_time)
                        if cold:
                            read[b] = copies_read_GBps([lay.qdata for lay in ls], th)
                    per.append((t, read))
                med = statistics.median
                for b in BITS:
                    tb = med(p[b] for p, _ in per)
                    nbytes = lays[b][0].nbytes()
                    read = med(r[b] for _, r in per) if cold else None
                    rows.append({
                        "shape": name, "N": n, "K": k, "M": m, "threads": th, "dtype": str(dt).replace("torch.", ""), "act_int8": a8,
                        "cold": cold, "bits": b, "time_s": tb, "weight_bytes": nbytes,
                        "GBps": nbytes / tb / 1e9,
                        "frac_read_bw": med(nbytes / p[b] / 1e9 / r[b] for p, r in per) if cold else None,
                        "read_GBps": read, "ratio_to_4bit": med(p[b] / p[4] for p, _ in per), "rounds": rounds,
                    })  # fmt: skip
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="4096x4096,gemma3-270m gate_proj",
                    help=f"comma-separated, from: {', '.join(SHAPES)} (default: 4096x4096, gemma3-270m gate_proj)")
    ap.add_argument("--m", default="1,128", help="comma-separated M values (default 1,128)")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved repetitions (median)")
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds of calls per measurement")
    ap.add_argument("--isa", choices=sorted(SIMULATE), help="run as on a CPU with only this instruction set")
    ap.add_argument("--hot", action="store_true", help="also time M <= 4 hot (one copy, in cache)")
    ap.add_argument("--json", metavar="FILE", help="write every number here")
    args = ap.parse_args(argv)
    if args.isa:
        simulate_isa(args.isa)
    names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in names if s not in SHAPES]
    if unknown:
        ap.error(f"unknown shapes {unknown}; choose from {list(SHAPES)}")
    ms = [int(v) for v in args.m.split(",")]
    threads = [int(v) for v in args.threads.split(",")]
    info = machine_info()
    print(header(info))
    print(f"RTN g{G} symmetric layers; cold (weights from DRAM) at M <= {COLD_MAX_M}"
          f"{' and hot (one copy, in cache)' if args.hot else ''}; median of {args.rounds} rounds")
    print(f"{'shape':<22} {'M':>4} {'thr':>3} {'acts':>8} {'bits':>4} {'time us':>9} {'GB/s':>6} "
          f"{'of read bw':>10} {'vs 4-bit':>8}")
    rows = []
    for name in names:
        n, k = SHAPES[name]
        for r in run_shape(name, n, k, ms, threads, args.rounds, args.min_time, args.hot):
            rows.append(r)
            frac = f"{r['frac_read_bw']:10.0%}" if r["frac_read_bw"] is not None else f"{'(hot)':>10}"
            print(f"{name:<22} {r['M']:>4} {r['threads']:>3} {('int8' if r['act_int8'] else r['dtype']):>8} {r['bits']:>4} {r['time_s'] * 1e6:9.1f} "
                  f"{r['GBps']:6.1f} {frac} {r['ratio_to_4bit']:8.2f}", flush=True)
    if args.json:
        out = {"command": info["command"], "machine": info, "rows": rows}
        tmp = args.json + ".tmp"
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
