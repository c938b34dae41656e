"""What the input rotation (``rotation="hadamard"``) costs at run time, and what it buys, in one run.

One model (default gemma3-270m), quantized twice from the same float weights: INT4 g128 RTN
(symmetric, the output layer in float) and the same with ``rotation="hadamard"``. For each:

* prefill tokens/s ([1, P] prompt of the built-in news corpus, last position's logits only) and
  decode tokens/s (greedy steps with the KV cache), as ``bench/decode.py`` measures them; the two
  models alternate for ``--rounds`` rounds and the median of each is printed, with rotated / plain;
* WikiText-2 perplexity (first ``--ppl-tokens`` tokens, context 512) and the KL divergence from the
  float model, so the cost sits beside the gain.

Also the rotation alone, per call at M = 1 (microseconds: the median over 20 blocks of the mean of
``--calls``/20 calls): the native butterflies (``llmquant.kernels.cpu.rotate_input``, what a CPU
layer runs; compiled for AVX-512, AVX2 and plain x86-64 and picked by the CPU, so ``--isa`` does not
cap it) and torch's 128 x 128 product (``llmquant.formats.rotation.rotate``), for the model's input
widths. In the models, layers that share their signs and input (q/k/v, gate/up) rotate it once.

    python bench/rotation.py
    python bench/rotation.py --json bench/results/rotation-<machine>.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

from decode import measure, prompts
from machine import SIMULATE, header, machine_info, simulate_isa

from llmquant import QuantConfig, QuantLinear, quantize
from llmquant.evals.compare import compare
from llmquant.evals.perplexity import perplexity
from llmquant.formats.rotation import layer_signs, rotate, unpack_signs
from llmquant.kernels.cpu import rotate_input
from llmquant.models import bos_for_raw_text, load_model


def per_call_us(fn, x: torch.Tensor, calls: int) -> float:
    """Median over 20 blocks of ``calls // 20`` back-to-back calls of the mean time of a call."""
    block = max(1, calls // 20)
    for _ in range(block):  # warm-up
        fn(x)
    means = []
    for _ in range(20):
        t0 = time.perf_counter()
        for _ in range(block):
            fn(x)
        means.append((time.perf_counter() - t0) / block)
    return statistics.median(means) * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32, help="greedy decode steps")
    ap.add_argument("--reps", type=int, default=3, help="prefill repetitions per round (median)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the two models (median)")
    ap.add_argument("--calls", type=int, default=2000, help="calls per rotation timing (20 timed blocks)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--ppl-tokens", type=int, default=2048, help="WikiText-2 tokens to score (0: skip)")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--isa", choices=sorted(SIMULATE), help="run as on a CPU with only this instruction set")
    args = ap.parse_args(argv)
    simulate_isa(args.isa)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info()
    print(header(machine) + f"; {torch.get_num_threads()} threads")

    base, tok = load_model(args.model, dtype=torch.float32)
    models = {}
    for label, rot in (("int4", None), ("int4+hadamard", "hadamard")):
        m = copy.deepcopy(base)
        quantize(m, QuantConfig(bits=4, group_size=128, rotation=rot), progress=False)
        models[label] = m
    rotated = sum(1 for mod in models["int4+hadamard"].modules() if isinstance(mod, QuantLinear) and mod.rot_signs is not None)
    linears = sum(1 for mod in models["int4"].modules() if isinstance(mod, QuantLinear))
    print(f"# {args.model}: INT4 g128 RTN symmetric, output layer float; {rotated} of {linears} quantized layers rotated")

    quality = {}
    if args.ppl_tokens:
        bos = bos_for_raw_text(args.model, tok)
        proto = dict(bos=bos, context=512, max_tokens=args.ppl_tokens, progress=False)
        quality["float"] = {"ppl": perplexity(base, tok, **proto)["ppl"]}
        for label, m in models.items():
            c = compare(base, m, tok, **proto)
            quality[label] = {"ppl": c["ppl_quant"], "kl": c["kl_mean"]}
        print(f"# WikiText-2 (first {args.ppl_tokens} tokens, context 512, BOS {bos}): "
              + ", ".join(f"{k} ppl {v['ppl']:.3f}" + (f" KL {v['kl']:.5f}" if "kl" in v else "") for k, v in quality.items()))

    ids = prompts(tok, 1, args.prompt_len)
    runs: dict[str, list[dict]] = {label: [] for label in models}
    for _ in range(args.rounds):
        for label, m in models.items():
            r = measure(m, ids, args.steps, args.reps)
            r.pop("tokens")
            runs[label].append(r)
    speed = {label: {key: statistics.median(r[key] for r in rs) for key in ("prefill_tok_s", "decode_tok_s")}
             for label, rs in runs.items()}
    print(f"# prompt {args.prompt_len} tokens, {args.steps} greedy steps, batch 1, fp32; median of {args.rounds} alternating rounds")
    print(f"{'model':14s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'decode ms/tok':>14s}")
    for label, s in speed.items():
        print(f"{label:14s} {s['prefill_tok_s']:14.1f} {s['decode_tok_s']:13.2f} {1000 / s['decode_tok_s']:14.2f}")
    p, r = speed["int4"], speed["int4+hadamard"]
    print(f"{'rotated/plain':14s} {r['prefill_tok_s'] / p['prefill_tok_s']:14.3f} {r['decode_tok_s'] / p['decode_tok_s']:13.3f} "
          f"{1000 / r['decode_tok_s'] - 1000 / p['decode_tok_s']:+14.2f}")

    widths = sorted({mod.in_features for mod in models["int4+hadamard"].modules()
                     if isinstance(mod, QuantLinear) and mod.rot_signs is not None})
    rot_us = []
    print(f"# the rotation alone, M = 1, us per call (median of 20 blocks of {max(1, args.calls // 20)} calls)")
    print(f"{'K':>6s} {'native':>8s} {'torch':>8s}")
    for k in widths:
        d = unpack_signs(layer_signs("bench", k), k)
        x = torch.randn(1, k)
        row = {"k": k, "native_us": per_call_us(lambda t: rotate_input(t, d), x, args.calls),
               "torch_us": per_call_us(lambda t: rotate(t, d), x, args.calls)}
        rot_us.append(row)
        print(f"{k:6d} {row['native_us']:8.2f} {row['torch_us']:8.2f}")

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        out = {"meta": machine | {"model": args.model, "prompt_len": args.prompt_len, "steps": args.steps,
                                  "rounds": args.rounds, "ppl_tokens": args.ppl_tokens,
                                  "rotated_layers": rotated, "quantized_layers": linears},
               "speed": speed, "runs": runs, "quality": quality, "rotation_us": rot_us}
        tmp = args.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(out, fh, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
