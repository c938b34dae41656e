"""A quantized transformers model on a CUDA GPU, end to end through the Triton kernel, in one run.

    python bench/triton_model.py --json model.json                  # CUDA, about a minute
    TRITON_INTERPRET=1 python bench/triton_model.py --dry-run --json dry.json   # CPU, fp32

What it checks, for a small Llama built from a config (random weights, seed 0; 2 layers, hidden
512, MLP 1408, vocabulary 4096) quantized by ``llmquant.quantize`` with RTN in several schemes:

* which kernel runs each quantized layer (``QuantLinear.kernel_description``): "triton" is expected
  for every scheme (3-bit layers too since their codes are split into two planes at load; before
  that they ran on the reference kernel);
* that the logits of a [2, 64] batch through the Triton kernel agree with the reference kernel
  (dequantize, then ``F.linear``) on the same model: relative mean absolute error, max abs error;
* how often the two agree on the top token (teacher-forced) and on a greedy generation (16 prompt
  tokens, 32 new ones): reported, not asserted (random weights give nearly flat logits);
* for INT4 g128: save with ``llmquant.save_quantized``, load with
  ``AutoModelForCausalLM.from_pretrained`` onto the GPU, and compare the logits (bit for bit).

Prints a table, writes everything to ``--json``; exits 1 if a check fails.
"""
import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _import_llmquant() -> None:
    """The installed llmquant, else this checkout's (a GPU image without it installed): pyproject maps
    ``llmquant.kernels`` to ``kernels/``, so the package path holds the checkout root too."""
    if importlib.util.find_spec("llmquant") is not None:
        return
    spec = importlib.util.spec_from_file_location("llmquant", ROOT / "llmquant" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "llmquant"), str(ROOT)])  # fmt: skip
    mod = importlib.util.module_from_spec(spec)
    sys.modules["llmquant"] = mod
    spec.loader.exec_module(mod)


_import_llmquant()

import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

import llmquant  # noqa: E402
from llmquant import QuantConfig, QuantLinear, quantize, save_quantized  # noqa: E402

SCHEMES = [
    ("int4-g128-sym", dict(bits=4, group_size=128)),
    ("int4-g64-asym", dict(bits=4, group_size=64, sym=False)),
    ("int4-g128-rotated", dict(bits=4, group_size=128, rotation="hadamard")),
    ("int8-g128-sym", dict(bits=8, group_size=128)),
    ("int2-g32-asym", dict(bits=2, group_size=32, sym=False)),
    ("int3-g128-sym", dict(bits=3, group_size=128)),
]
TOL = {torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float32: 1e-4}  # logits, rel mean abs error


def build_model(work_dir, device, dtype):
    """The float model as a user gets it: written once (fp32), then ``from_pretrained(dtype=...)``, so
    that it and a reloaded quantized checkpoint build their buffers (rotary frequencies) alike."""
    path = Path(work_dir) / "float"
    if not path.exists():
        cfg = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=2, num_attention_heads=8,
                          num_key_value_heads=4, vocab_size=4096, max_position_embeddings=512)  # fmt: skip
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def set_kernel(model, name):
    """Run every quantized layer on ``name`` (None: the registry's own choice)."""
    if name is None:
        os.environ.pop("LLMQUANT_KERNEL", None)
    else:
        os.environ["LLMQUANT_KERNEL"] = name
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.invalidate_kernel()


def kernels_of(model, dtype):
    return dict(Counter(m.kernel_description(dtype) for m in model.modules() if isinstance(m, QuantLinear)))


@torch.no_grad()
def run_scheme(work_dir, name, kw, device, dtype, ids, prompt, new_tokens):
    row = {"scheme": name, "dtype": str(dtype).replace("torch.", "")}
    model = build_model(work_dir, device, dtype)
    float_logits = model(ids).logits.float()
    t = time.perf_counter()
    quantize(model, QuantConfig(**kw), progress=False)
    row["quantize_s"] = round(time.perf_counter() - t, 2)
    set_kernel(model, None)
    row["kernels"] = kernels_of(model, dtype)
    t = time.perf_counter()
    logits = model(ids).logits.float()
    row["first_forward_s"] = round(time.perf_counter() - t, 2)
    gen = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
    set_kernel(model, "reference")
    ref = model(ids).logits.float()
    gen_ref = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
    set_kernel(model, None)
    rel = float((logits - ref).abs().mean() / ref.abs().mean())
    # top-1 agreement is informational: a random-weight model's logits are nearly flat, so bf16
    # rounding differences between two correct kernels flip some argmaxes (and then a greedy run)
    row.update(rel_err_vs_reference=rel, max_abs_vs_reference=float((logits - ref).abs().max()),
               top1_agree=float((logits.argmax(-1) == ref.argmax(-1)).float().mean()),
               greedy_agree=float((gen == gen_ref).float().mean()),
               kl_from_float=float(torch.nn.functional.kl_div(logits.log_softmax(-1), float_logits.log_softmax(-1),
                                                              log_target=True, reduction="batchmean")) / ids.shape[1])  # fmt: skip
    ok = rel < TOL[dtype] and bool(torch.isfinite(logits).all())
    row["status"] = "ok" if ok else "FAIL"
    return row, model, logits


@torch.no_grad()
def roundtrip(model, logits, ids, device, dtype):
    with tempfile.TemporaryDirectory() as d:
        save_quantized(model, Path(d) / "ckpt")
        loaded = AutoModelForCausalLM.from_pretrained(Path(d) / "ckpt", dtype=dtype).to(device).eval()
        again = loaded(ids).logits.float()
    same = bool(torch.equal(again, logits))
    return {"check": "save_quantized -> from_pretrained", "kernels": kernels_of(loaded, dtype),
            "bit_exact": same, "max_abs": float((again - logits).abs().max()), "status": "ok" if same else "FAIL"}  # fmt: skip


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--dry-run", action="store_true", help="CPU with TRITON_INTERPRET=1 (fp32 only)")
    args = ap.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device (use --dry-run with TRITON_INTERPRET=1 on a CPU)")
    dtypes = [torch.float32] if args.dry_run else [torch.float16, torch.bfloat16]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 4096, (2, 64), generator=g).to(device)
    prompt = ids[:1, :16]
    new_tokens = 32
    schemes = SCHEMES
    if args.dry_run:  # the interpreter runs one program at a time: a smoke test of the script only
        ids, prompt, new_tokens, schemes = ids[:1, :8], ids[:1, :4], 2, [SCHEMES[0], SCHEMES[-1]]
    import triton

    result = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "transformers": transformers.__version__, "triton": triton.__version__,
                          "llmquant": getattr(llmquant, "__version__", "?"), "device": device,
                          "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None},
              "protocol": __doc__, "rows": []}  # fmt: skip
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llmquant-triton-model-") as work_dir:  # the float model, once
        for dtype in dtypes:
            for name, kw in schemes if dtype == dtypes[0] else schemes[:1]:
                try:
                    row, model, logits = run_scheme(work_dir, name, kw, device, dtype, ids, prompt, new_tokens)
                    if name == "int4-g128-sym":
                        result["rows"].append(row)
                        row = {"scheme": name, "dtype": row["dtype"], **roundtrip(model, logits, ids, device, dtype)}
                except Exception as e:
                    row = {"scheme": name, "dtype": str(dtype), "status": f"ERROR {type(e).__name__}: {str(e)[:300]}"}
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
    result["elapsed_s"] = time.perf_counter() - t0
    Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    print(f"\n{'scheme':18s} {'dtype':9s} {'kernels':34s} {'rel err':>8s} {'top1':>5s} {'greedy':>6s} {'KL':>7s}  status")
    for r in result["rows"]:
        print(f"{r['scheme']:18s} {r['dtype']:9s} {json.dumps(r.get('kernels', {}))[:34]:34s} "
              f"{r.get('rel_err_vs_reference', float('nan')):8.1e} {r.get('top1_agree', float('nan')):5.2f} "
              f"{r.get('greedy_agree', float('nan')):6.2f} "
              f"{r.get('kl_from_float', float('nan')):7.4f}  {r.get('check', '')} {r['status']}")  # fmt: skip
    print(f"total {result['elapsed_s']:.0f} s")
    return 0 if all(r["status"] == "ok" for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
