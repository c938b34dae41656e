"""End-to-end CPU speed of the default models, float vs INT4 or INT8 (the native CPU kernel).

For each model, activation dtype and batch size it measures, on the same prompt (windows of the
built-in news corpus):

* prefill tokens/s: one forward pass over a [B, P] prompt (B * P tokens / seconds, median of runs)
  that computes the logits of the last position only (``logits_to_keep=1``, as generation and our
  server do: the full-vocabulary head over every position would dominate a small model's prefill);
* decode tokens/s: a greedy loop of T steps with the KV cache after that prefill
  (B * T tokens / seconds).

The INT4 model is ``llmquant.quantize(model, QuantConfig(bits=4, group_size=128,
quantize_lm_head=True))`` (RTN, symmetric, the head quantized too, to ``--head-bits``; ``--bits 8``
quantizes the block linears to INT8 instead); every linear layer then runs on the kernel the registry
picks (printed; "cpu" is the native kernel). The same model also runs with dynamic INT8 activations
("int4+a8": W4A8, or with ``--bits 8`` W8A8; ``LLMQUANT_ACTIVATIONS=dynamic_int8``).
The fraction of greedy tokens that agree with the float model's is printed as a sanity check; the
quality numbers are the WikiText-2 perplexity of the three models and the KL divergence of each
quantized one from the float model (fp32, context 512, first ``--ppl-tokens`` tokens), printed beside
the speeds. ``--isa avx2`` runs as on an AVX2-only CPU (bench/machine.py).

    python bench/decode.py --quick
    python bench/decode.py --models gemma3-270m,smollm2-135m --batch 1,8 --json out/decode.json
    python bench/decode.py --isa avx2 ...
    python bench/decode.py --bits 8 ...                # INT8 block linears: W8A16 vs W8A8
"""
from __future__ import annotations

import argparse
import collections
import copy
import functools
import inspect
import json
import os
import statistics
import sys
import time

import torch

from machine import SIMULATE, header, machine_info, simulate_isa

from llmquant import QuantConfig, QuantLinear, quantize
from llmquant.evals.compare import compare
from llmquant.evals.perplexity import perplexity
from llmquant.models import bos_for_raw_text, load_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@functools.cache
def _last_logits_only(model_class: type) -> dict:
    """forward() kwargs for the last position's logits only, where the model class takes them."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model_class.forward).parameters else {}


@torch.inference_mode()
def prefill(model, ids: torch.Tensor):
    out = model(input_ids=ids, use_cache=True, **_last_logits_only(type(model)))
    return out.logits[:, -1], out.past_key_values


@torch.inference_mode()
def greedy(model, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, float]:
    """Tokens [B, steps] and the seconds the decode steps took (prefill excluded)."""
    logits, cache = prefill(model, ids)
    tok = logits.argmax(-1, keepdim=True)
    out = [tok]
    t0 = time.perf_counter()
    for _ in range(steps - 1):
        o = model(input_ids=tok, past_key_values=cache, use_cache=True)
        cache = o.past_key_values
        tok = o.logits[:, -1].argmax(-1, keepdim=True)
        out.append(tok)
    return torch.cat(out, dim=1), time.perf_counter() - t0


def prompts(tok, batch: int, prompt_len: int) -> torch.Tensor:
    """[batch, prompt_len] token ids of real English text (windows of the built-in news corpus), so
    that the greedy continuations of the two models can be compared meaningfully."""
    from llmquant.calibration import calibration_batches

    return torch.cat(calibration_batches(tok, "builtin", nsamples=batch, seqlen=prompt_len, seed=batch))


def measure(model, ids: torch.Tensor, steps: int, reps: int) -> dict:
    batch, prompt_len = ids.shape
    prefill(model, ids[:, :8])  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        prefill(model, ids)
        times.append(time.perf_counter() - t0)
    t_pre = statistics.median(times)
    tokens, t_dec = greedy(model, ids, steps)
    return {
        "prefill_tok_s": batch * prompt_len / t_pre,
        "decode_tok_s": batch * (steps - 1) / t_dec,
        "prefill_s": t_pre,
        "decode_s": t_dec,
        "tokens": tokens,
    }


def cast_activations(model, dtype: torch.dtype):
    """model.to(dtype), except the quantized layers' stored tensors (fp16 scales must stay fp16)."""
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            continue
        for name, p in mod.named_parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in mod.named_buffers(recurse=False):
            if b.is_floating_point():
                setattr(mod, name, b.to(dtype))
    return model


def kernels_used(model, dtype) -> dict:
    counts = collections.Counter()
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            counts[mod.kernel_description(dtype)] += 1
    return dict(counts)


def set_act_int8(model, on: bool) -> None:
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            mod.act_int8 = on
            mod.invalidate_kernel()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="gemma3-270m,smollm2-135m")
    ap.add_argument("--dtypes", default="fp32,bf16", help="activation (and float model) dtypes")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32, help="greedy decode steps")
    ap.add_argument("--reps", type=int, default=3, help="prefill repetitions (median)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--bits", type=int, default=4, choices=(4, 8), help="bits of the quantized block linears")
    ap.add_argument("--head-bits", type=int, default=4, choices=(4, 8), help="bits of the quantized lm_head")
    ap.add_argument("--ppl-tokens", type=int, default=2048, help="WikiText-2 tokens to score (0: skip)")
    ap.add_argument("--quick", action="store_true", help="smollm2-135m, fp32, batch 1, short prompt")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--no-a8", action="store_true", help="skip the dynamic INT8 activation runs")
    ap.add_argument("--isa", choices=sorted(SIMULATE), help="run as on a CPU with only this instruction set")
    args = ap.parse_args(argv)
    simulate_isa(args.isa)
    if args.quick:
        args.models, args.dtypes, args.batch, args.prompt_len, args.steps, args.reps = "smollm2-135m", "fp32", "1", 64, 16, 2
        args.ppl_tokens = 0
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info()
    print(header(machine) + f"; {torch.get_num_threads()} threads")
    q = f"int{args.bits}"
    print(f"# prompt {args.prompt_len} tokens, {args.steps} greedy steps; tokens/s; INT{args.bits} g128 RTN, lm_head INT{args.head_bits}; "
          f"x: INT{args.bits} over float; a8: INT{args.bits} with dynamic INT8 activations")
    print(f"{'model':14s} {'dtype':5s} {'B':>3s} {'float prefill':>14s} {q + ' prefill':>13s} {'x':>5s} {'a8 prefill':>11s} {'x':>5s} "
          f"{'float decode':>13s} {q + ' decode':>12s} {'x':>5s} {'a8 decode':>10s} {'x':>5s} {'agree':>6s}  kernels")  # fmt: skip
    results = []
    for name in args.models.split(","):
        base, tok = load_model(name, dtype=torch.float32)
        qmodel = copy.deepcopy(base)
        head = {} if args.head_bits == args.bits else {"lm_head": {"bits": args.head_bits}}
        quantize(qmodel, QuantConfig(bits=args.bits, group_size=128, quantize_lm_head=True, overrides=head), progress=False)
        ppl, kl = {}, {}
        if args.ppl_tokens:
            bos = bos_for_raw_text(name, tok)
            proto = dict(bos=bos, context=512, max_tokens=args.ppl_tokens, progress=False)
            ppl["float"] = perplexity(base, tok, **proto)["ppl"]
            for label, a8 in ((q, False), (q + "+a8", True)):
                if a8 and args.no_a8:
                    continue
                set_act_int8(qmodel, a8)
                c = compare(base, qmodel, tok, **proto)
                ppl[label], kl[label] = c["ppl_quant"], c["kl_mean"]
            set_act_int8(qmodel, False)
            print(f"# {name}: WikiText-2 (first {args.ppl_tokens} tokens, context 512, BOS {bos}): perplexity "
                  + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items()) + "; KL from float (nats/token) "
                  + ", ".join(f"{k} {v:.5f}" for k, v in kl.items()), flush=True)  # fmt: skip
        for dname in args.dtypes.split(","):
            dt = DTYPES[dname]
            fm, qm = base.to(dt), cast_activations(qmodel, dt)
            for b in (int(v) for v in args.batch.split(",")):
                ids = prompts(tok, b, args.prompt_len)
                f = measure(fm, ids, args.steps, args.reps)
                set_act_int8(qm, False)
                qr = measure(qm, ids, args.steps, args.reps)
                used = kernels_used(qm, dt)
                a = None
                if not args.no_a8:
                    set_act_int8(qm, True)
                    a = measure(qm, ids, args.steps, args.reps)
                    a.pop("tokens")
                    set_act_int8(qm, False)
                agree = (f.pop("tokens") == qr.pop("tokens")).float().mean().item()
                results.append({"model": name, "dtype": dname, "batch": b, "float": f, q: qr, q + "_a8": a,
                                "agree": agree, "kernels": used, "ppl": ppl, "kl": kl, "bits": args.bits,
                                "head_bits": args.head_bits})  # fmt: skip
                na = float("nan")
                print(f"{name:14s} {dname:5s} {b:3d} {f['prefill_tok_s']:14.1f} {qr['prefill_tok_s']:13.1f} "
                      f"{qr['prefill_tok_s'] / f['prefill_tok_s']:5.2f} {a['prefill_tok_s'] if a else na:11.1f} "
                      f"{a['prefill_tok_s'] / f['prefill_tok_s'] if a else na:5.2f} {f['decode_tok_s']:13.1f} "
                      f"{qr['decode_tok_s']:12.1f} {qr['decode_tok_s'] / f['decode_tok_s']:5.2f} "
                      f"{a['decode_tok_s'] if a else na:10.1f} {a['decode_tok_s'] / f['decode_tok_s'] if a else na:5.2f} "
                      f"{agree:6.2f}  {used}", flush=True)  # fmt: skip
        del base, qmodel, fm, qm
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        meta = machine | {"prompt_len": args.prompt_len, "steps": args.steps, "ppl_tokens": args.ppl_tokens}
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
