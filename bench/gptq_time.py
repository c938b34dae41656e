"""Time GPTQ per stage on a real model.

    python bench/gptq_time.py                       # gemma3-270m, 128 x 512 tokens, 4-bit, G=128
    python bench/gptq_time.py --model smollm2-135m --act-order --json gptq_time.json

Stages: ``load`` (model and tokenizer), ``calibration`` (tokenize the built-in text and cut the
sequences), then the quantizer's own: ``capture`` (embedding pass that records the first block's
inputs), ``hessian`` (block forwards with Hessian hooks), ``gptq`` (the solver), ``forward`` (quantized
block outputs for the next block), ``lm_head``. The protocol (model, dtype, calibration, config, threads,
CPU, torch version) is printed with the table and stored in the JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch
from machine import cpu_name

from llmquant.calibration import calibration_batches
from llmquant.config import QuantConfig
from llmquant import quantize

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load(name: str, dtype: torch.dtype):
    """(model, tokenizer, bos) via llmquant.models when present, else plain transformers."""
    try:
        from llmquant import models
    except ImportError:
        models = None
    if models is not None:
        model, tok = models.load_model(name, dtype=dtype)
        return model, tok, models.bos_for_raw_text(name, tok)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).eval()
    return model, tok, None




def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma3-270m", help="built-in name or HF path (default: gemma3-270m)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--source", default="builtin", help="calibration source (see llmquant.calibration)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--asym", action="store_true")
    p.add_argument("--act-order", action="store_true")
    p.add_argument("--static-groups", action="store_true")
    p.add_argument("--clip-search", action="store_true")
    p.add_argument("--no-true-sequential", action="store_true")
    p.add_argument("--quantize-lm-head", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--verbose", action="store_true", help="log the per-block summary")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    times: dict[str, float] = {}
    t0 = time.perf_counter()
    model, tok, bos = load(args.model, DTYPES[args.dtype])
    times["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    calib = calibration_batches(tok, args.source, nsamples=args.nsamples, seqlen=args.seqlen, bos=bos)
    times["calibration"] = time.perf_counter() - t0

    config = QuantConfig(
        bits=args.bits,
        group_size=args.group_size,
        sym=not args.asym,
        method="gptq",
        act_order=args.act_order,
        static_groups=args.static_groups,
        clip_search=args.clip_search,
        true_sequential=not args.no_true_sequential,
        quantize_lm_head=args.quantize_lm_head,
    )
    t0, c0 = time.perf_counter(), time.process_time()
    summary = quantize(model, config, calib, progress=True)
    quant_seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - c0
    times.update(summary["stages"])
    times["quantize (total)"] = quant_seconds

    protocol = {
        "model": args.model,
        "dtype": args.dtype,
        "calibration": {"source": args.source, "nsamples": args.nsamples, "seqlen": args.seqlen, "bos": bos},
        "config": config.to_dict(),
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        # other work on the machine stretches wall time; CPU time of this process is the fairer
        # measure on a shared box (load average at the end of the run, 1/5/15 minutes)
        "loadavg": list(os.getloadavg()),
        "quantize_cpu_seconds": cpu_seconds,
    }
    errs = [m["rel_err"] for m in summary["modules"].values()]
    print(f"GPTQ timing: {args.model} ({args.dtype}), {args.nsamples} x {args.seqlen} tokens, "
          f"{args.bits}-bit G={args.group_size} {'asym' if args.asym else 'sym'}"
          f"{' act-order' if args.act_order else ''}{' static-groups' if args.static_groups else ''}"
          f"{'' if config.true_sequential else ' (not true-sequential)'}; "
          f"{protocol['threads']} threads on {protocol['cpu']}, torch {protocol['torch']}")
    print(f"{'stage':<20}{'seconds':>10}")
    for k, v in times.items():
        print(f"{k:<20}{v:>10.1f}")
    print(f"quantize CPU time {cpu_seconds:.1f} s over {protocol['threads']} threads; load average "
          f"{' '.join(f'{x:.2f}' for x in protocol['loadavg'])}")
    print(f"{summary['layers']} layers quantized; relative output error (||WX-QX||^2/||WX||^2) "
          f"mean {sum(errs) / len(errs):.3e}, max {max(errs):.3e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"protocol": protocol, "seconds": times, "summary": summary}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
