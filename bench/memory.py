"""Resident memory of float and quantized gemma3-270m, loaded as a user loads them, against the bytes
of their checkpoints.

For each model and activation dtype, a fresh process imports llmquant and torch and loads the
tokenizer, notes its resident set (VmRSS), loads the checkpoint with
``AutoModelForCausalLM.from_pretrained`` (kernels are prepared at load), runs one forward pass over a
64-token prompt, and notes VmRSS again and its peak (VmHWM). "gained" is the difference: what the
model costs in memory (the tokenizer, 320 MiB for Gemma's 262k vocabulary, is not counted). The quantized checkpoints are made
first (RTN, g128, head and embedding in float) in a temporary folder.

    python bench/memory.py                       # gemma3-270m: float, INT4, INT3; fp32 and bf16
    python bench/memory.py --json bench/results/memory-NAME.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import SIMULATE, header, machine_info, simulate_isa


def rss() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def child(path: str, dtype: str) -> dict:
    import torch

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmquant  # noqa: F401  (the llmquant quantization method)

    tok = AutoTokenizer.from_pretrained(path)
    before = rss()
    model = AutoModelForCausalLM.from_pretrained(path, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    loaded = rss()
    ids = tok("The quick brown fox jumps over the lazy dog. " * 6, return_tensors="pt").input_ids[:, :64]
    with torch.inference_mode():
        model(ids)
    after = rss()
    return {"rss_before": before["VmRSS"], "rss_loaded": loaded["VmRSS"], "rss_after_forward": after["VmRSS"],
            "peak": after["VmHWM"], "gained": after["VmRSS"] - before["VmRSS"]}


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--bits", default="4,3", help="quantized variants (RTN g128)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--isa", choices=sorted(SIMULATE))
    ap.add_argument("--child", nargs=2, metavar=("PATH", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    simulate_isa(args.isa)
    import llmquant
    from llmquant import QuantConfig
    from llmquant.models import load_model, resolve

    machine = machine_info()
    print(header(machine))
    src = Path(resolve(args.model))
    variants = [("float", src)]
    tmp = tempfile.TemporaryDirectory()
    for b in (int(v) for v in args.bits.split(",") if v):
        model, tok = load_model(args.model)
        llmquant.quantize(model, QuantConfig(bits=b, group_size=128), progress=False)
        out = llmquant.save_quantized(model, Path(tmp.name) / f"int{b}", tok)
        del model
        variants.append((f"int{b}", out))
    print(f"# one forward of 64 tokens after loading; MiB; gained: resident set after the forward minus before loading")
    print(f"{'model':8s} {'dtype':5s} {'ckpt MiB':>9s} {'gained':>8s} {'x ckpt':>7s} {'peak':>8s}  target: gained <= 1.15 x ckpt + 150 MiB")
    rows = []
    for label, path in variants:
        ck = checkpoint_bytes(path)
        for dtype in args.dtypes.split(","):
            proc = subprocess.run([sys.executable, __file__, "--child", str(path), dtype], capture_output=True,
                                  text=True, check=True, env=os.environ)
            r = json.loads(proc.stdout.strip().splitlines()[-1]) | {"model": label, "dtype": dtype, "ckpt_bytes": ck}
            r["meets_target"] = r["gained"] <= 1.15 * ck + 150 * 2**20
            rows.append(r)
            mib = 2**20
            print(f"{label:8s} {dtype:5s} {ck / mib:9.1f} {r['gained'] / mib:8.1f} {r['gained'] / ck:7.2f} "
                  f"{(r['peak'] - r['rss_before']) / mib:8.1f}  {'ok' if r['meets_target'] else 'over'}", flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "model": args.model, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
