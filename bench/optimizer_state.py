"""Optimizer-state memory of the parameter sets llmquant trains, for 8-bit AdamW (bitsandbytes) and torch's AdamW.

    python bench/optimizer_state.py --model gemma3-270m [--json bench/results/optimizer-state-gemma3-270m.json]

For each set (the scales of an INT4 g128 model as ``recover`` trains them; scales + norms; scales +
latent codes; every float parameter of the decoder blocks as ``distill`` trains them) it builds the
parameters with the model's real shapes, runs one optimizer step (gradients of ones) and sums the bytes
of the tensors each optimizer keeps. bitsandbytes keeps tensors under 4096 elements in fp32
(``min_8bit_size``), which is why small scale tensors save less than 4x.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def param_sets(model) -> dict[str, list[torch.Size]]:
    from llmquant.modules.walk import find_linear_layers, linear_weight
    from llmquant.quantizers.blocks import find_layer_stack

    _, layers = find_layer_stack(model)
    linears = [linear_weight(m).shape for b in layers for _, m in find_linear_layers(b)]
    scales = [torch.Size((n, math.ceil(k / 128))) for n, k in linears]
    norms = [p.shape for b in layers for m in b.modules() if type(m).__name__.endswith("RMSNorm")
             for p in m.parameters(recurse=False)]
    blocks = [p.shape for b in layers for p in b.parameters()]
    return {"recover: scales (INT4 g128)": scales, "recover: scales + norms": scales + norms,
            "recover: scales + codes (latent)": scales + linears, "distill: all decoder-block parameters": blocks}


def state_bytes(shapes: list[torch.Size], kind: str) -> int:
    from llmquant.distill.trainer import TrainConfig, make_optimizer, optimizer_state_bytes

    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for p in params:
        p.grad = torch.ones_like(p)
    opt = make_optimizer([{"params": params, "lr": 1e-4}], TrainConfig(optimizer=kind))
    opt.step()
    return optimizer_state_bytes(opt)


def main(argv: list[str] | None = None) -> int:
    from machine import machine_info  # bench/machine.py: names the CPU, ISA and threads

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from llmquant.models import load_model

    model, _ = load_model(args.model)
    rows = []
    for name, shapes in param_sets(model).items():
        n = sum(math.prod(s) for s in shapes)
        b8, b32 = state_bytes(shapes, "adamw8bit"), state_bytes(shapes, "adamw")
        rows.append({"set": name, "parameters": n, "adamw8bit_bytes": b8, "adamw_bytes": b32, "ratio": b32 / b8})
    print(f"optimizer state, {args.model}")
    print("| parameter set | values | AdamW8bit MiB | AdamW MiB | AdamW / 8-bit |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['set']} | {r['parameters']:,} | {r['adamw8bit_bytes'] / 2**20:.2f} | {r['adamw_bytes'] / 2**20:.2f} "
              f"| {r['ratio']:.2f}× |")
    if args.json:
        from llmquant.fsutil import atomic_write_text

        atomic_write_text(args.json, json.dumps({"model": args.model, "machine": machine_info(), "rows": rows,
                                                 "command": "python bench/optimizer_state.py " + " ".join(
                                                     sys.argv[1:] if argv is None else argv)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
