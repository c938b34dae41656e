"""Benchmark of the CPU decode's software prefetch distances (``LLMQUANT_CPU_PREFETCH``), in one run.

The GEMVs (AVX2 and AVX-512) prefetch the codes they will read some bytes ahead into L1 and, further ahead, into
L2 (kernels/csrc/lq_api.c). This times one INT4 g128 layer at M = 1, cold (each call uses the next of
several weight copies, together larger than the last-level cache), for every given pair of distances,
with fp32, bf16 and dynamic INT8 activations, in ``--rounds`` interleaved rounds (every setting once per
round; reported: medians over rounds of the times, and of the per-round ratios to the first setting).
The read bandwidth of the same weight copies (``kernels.copies_read_GBps``) is measured in every round.
Use it to tune a CPU the defaults were not measured on (``--isa avx2`` times the AVX2 kernels on an
AVX-512 CPU).

    python bench/prefetch.py --isa avx2
    python bench/prefetch.py --isa avx2 --settings "2048,16384;2048,0;0,0" --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
from kernels import copies_read_GBps, timeit
from lowbit import G, layouts
from machine import SIMULATE, header, machine_info, simulate_isa

from llmquant.fsutil import atomic_write_text
from llmquant.kernels import cpu_native
from llmquant.kernels.cpu import cpu_linear

DEFAULT_SETTINGS = "2048,16384;0,0;2048,0;0,16384;1024,16384;4096,16384;2048,8192;2048,32768"
# activation modes: fp32 and bf16 (the exact three-limb decode), fp32 with dynamic INT8 activations
MODES = (("fp32", torch.float32, False), ("bf16", torch.bfloat16, False), ("int8", torch.float32, True))


def parse_settings(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(";"):
        if part.strip():
            l1, l2 = (int(v) for v in part.split(","))
            out.append((l1, l2))
    if not out:
        raise ValueError("no prefetch settings given")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", default=DEFAULT_SETTINGS,
                    help="';'-separated 'L1,L2' byte distances; the first is the baseline of the ratios "
                         f"(default: {DEFAULT_SETTINGS})")
    ap.add_argument("--shape", default="4096x4096", help="N x K (default 4096x4096)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved repetitions (median)")
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds of calls per measurement")
    ap.add_argument("--isa", choices=sorted(SIMULATE), help="run as on a CPU with only this instruction set")
    ap.add_argument("--json", metavar="FILE", help="write every number here")
    args = ap.parse_args(argv)
    if args.isa:
        simulate_isa(args.isa)
    try:
        settings = parse_settings(args.settings)
        n, k = (int(v) for v in args.shape.lower().split("x"))
    except ValueError as e:
        ap.error(f"--settings/--shape: {e}")
    native, why = cpu_native.load()
    if native is None:
        raise SystemExit(f"the native CPU kernel library is unavailable: {why}")
    default = native.prefetch
    for s in settings:  # refuse a bad setting before minutes of timing
        native.prefetch = s
    native.prefetch = default
    torch.set_num_threads(args.threads)
    info = machine_info()
    print(header(info) + f"; prefetch default {default[0]},{default[1]}")
    lays = layouts(n, k, 4, copies=True)
    lay = lays[0]
    x32 = torch.randn(1, k)
    per, reads = [], []
    try:
        for _ in range(args.rounds):
            reads.append(copies_read_GBps([lay.qdata for lay in lays], args.threads))
            t = {}
            for name, dt, a8 in MODES:
                x = x32.to(dt)
                for s in settings:
                    native.prefetch = s
                    t[name, s] = timeit(lambda i: cpu_linear(x, lays[i], act_int8=a8), len(lays), args.min_time)
            per.append(t)
    finally:
        native.prefetch = default
    read = statistics.median(reads)
    print(f"INT4 g{G} {n}x{k}, M = 1, cold, {args.threads} threads; read bandwidth of the copies {read:.1f} GB/s "
          f"(median of {args.rounds} rounds: {min(reads):.1f}-{max(reads):.1f}); median of {args.rounds} rounds")
    print(f"{'acts':>5} {'L1':>6} {'L2':>7} {'time us':>9} {'GB/s':>6} {'of read bw':>10} {'vs first':>8}")
    rows = []
    for name, _, _ in MODES:
        for s in settings:
            ts = statistics.median(p[name, s] for p in per)
            ratio = statistics.median(p[name, s] / p[name, settings[0]] for p in per)
            gbps = lay.nbytes() / ts / 1e9
            rows.append({"acts": name, "l1": s[0], "l2": s[1], "time_s": ts, "GBps": gbps, "frac_read_bw": gbps / read,
                         "ratio_to_first": ratio, "read_GBps": read, "rounds": args.rounds})
            print(f"{name:>5} {s[0]:>6} {s[1]:>7} {ts * 1e6:9.1f} {gbps:6.1f} {gbps / read:10.0%} {ratio:8.2f}", flush=True)
    if args.json:
        out = {"command": info["command"], "machine": info, "shape": [n, k], "threads": args.threads,
               "default": list(default), "read_GBps_rounds": reads, "rows": rows}
        atomic_write_text(args.json, json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
