"""Pruning results: perplexity against sparsity (magnitude, Wanda, SparseGPT; unstructured and 2:4) and
the structured students (perplexity against kept parameters, greedy decode tokens/s).

    python -m llmquant.evals.pruning sparsity --model smollm2-135m --sparsity 0.3 0.5 0.7
    python -m llmquant.evals.pruning students --teacher smollm2-135m --student LABEL=FOLDER ...
    python -m llmquant.evals.pruning gradual --model smollm2-135m --keep 0.6 --rounds 3 --steps 90
    python -m llmquant.evals.pruning gradual --model smollm2-135m --method magnitude --sparsity 0.5 --steps 90

``sparsity`` prunes the model in memory with each method (calibration: the built-in news text, 32
sequences of 512 tokens; never the evaluation text) and scores it on the WikiText-2 protocol; rows are
kept in the JSON as they finish, so an interrupted sweep resumes. ``students`` scores a teacher and its
pruned (and distilled) students on the same protocol and times greedy decoding of each, in one run on
one machine (median of several runs). Both write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png``
into evals/results/.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
METHODS = ("magnitude", "wanda", "sparsegpt")


def _ppl(model, tok, name: str, args, label: str) -> dict:
    from llmquant.evals.perplexity import perplexity
    from llmquant.models import bos_for_raw_text

    return perplexity(model, tok, bos=bos_for_raw_text(name, tok), corpus=args.corpus, context=args.context,
                      max_tokens=args.max_tokens, label=label, progress=False)


def run_sparsity(args: argparse.Namespace) -> dict:
    import torch

    from llmquant.calibration import calibration_batches
    from llmquant.evals.machine import machine_info
    from llmquant.models import bos_for_raw_text, load_model
    from llmquant.prune import SparsityConfig

    out = args.out / f"pruning_sparsity_{args.model}.json"
    old = json.loads(out.read_text()) if out.exists() else {}
    done = {(r["method"], r["pattern"], r["target_sparsity"]): r for r in old.get("rows", [])}
    rows = list(done.values())
    model, tok = load_model(args.model)
    if ("dense", "dense", 0.0) not in done:
        rows.append(dict(_ppl(model, tok, args.model, args, "dense"), method="dense", pattern="dense",
                         target_sparsity=0.0, sparsity=0.0, prune_seconds=0.0))
    del model
    cal = calibration_batches(tok, "builtin", 32, 512, bos=bos_for_raw_text(args.model, tok))
    jobs = [(m, "unstructured", s) for s in args.sparsity for m in args.methods]
    if args.nm:
        jobs += [(m, args.nm, 1 - int(args.nm.split(":")[0]) / int(args.nm.split(":")[1])) for m in args.methods]
    result = {"model": args.model, "rows": rows}
    for method, pattern, sparsity in jobs:
        if (method, pattern, sparsity) in done:
            continue
        model, _ = load_model(args.model)
        cfg = SparsityConfig(method=method, sparsity=sparsity if pattern == "unstructured" else 0.5, pattern=pattern)
        t0 = time.perf_counter()
        model, summary = cfg.get_method().apply(model, cfg, cal, False)
        sec = time.perf_counter() - t0
        r = _ppl(model, tok, args.model, args, f"{method} {pattern} {sparsity}")
        rows.append(dict(r, method=method, pattern=pattern, target_sparsity=sparsity, sparsity=summary["sparsity"],
                         prune_seconds=round(sec, 1)))
        print(f"{args.model} {method:9s} {pattern:12s} {sparsity:.2f}: ppl {r['ppl']:.2f} ({sec:.0f} s)", flush=True)
        del model
        torch.manual_seed(0)
        result["machine"] = machine_info()
        _save_partial(out, result)
    base = next(r["ppl"] for r in rows if r["method"] == "dense")
    for r in rows:
        r["ppl_increase_pct"] = 100 * (r["ppl"] / base - 1)
    rows.sort(key=lambda r: (r["pattern"] != "dense", r["pattern"], r["target_sparsity"], METHODS.index(r["method"])
                             if r["method"] in METHODS else -1))
    result["machine"] = machine_info()
    result["calibration"] = "builtin news text, 32 sequences x 512 tokens (llmquant.calibration)"
    result["sparsegpt_vs_magnitude"] = _ratios(rows)
    return result


def _ratios(rows: list[dict]) -> list[dict]:
    """SparseGPT's perplexity increase as a fraction of magnitude pruning's, per pattern and sparsity."""
    out = []
    for key in sorted({(r["pattern"], r["target_sparsity"]) for r in rows if r["method"] == "sparsegpt"}):
        inc = {r["method"]: r["ppl_increase_pct"] for r in rows if (r["pattern"], r["target_sparsity"]) == key}
        if "magnitude" in inc and inc["magnitude"] > 0:
            out.append({"pattern": key[0], "sparsity": key[1], "sparsegpt_increase_pct": inc["sparsegpt"],
                        "magnitude_increase_pct": inc["magnitude"],
                        "ratio": inc["sparsegpt"] / inc["magnitude"]})
    return out


def _save_partial(path: Path, result: dict) -> None:
    from llmquant.evals.perplexity import write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)


def write_sparsity(result: dict, out: Path, quiet: bool = False) -> None:
    from llmquant.evals.perplexity import format_table, write_json
    from llmquant.evals.sweep import finish_report, report_head

    stem = f"pruning_sparsity_{result['model']}"
    write_json(out / f"{stem}.json", result)
    table = format_table(result["rows"], [("method", "method"), ("pattern", "pattern"), ("sparsity", "sparsity"),
                                          ("ppl", "ppl"), ("Δ ppl %", "ppl_increase_pct"),
                                          ("prune s", "prune_seconds")])
    lines = report_head(f"Unstructured and 2:4 pruning: {result['model']}", result["machine"], table,
                        result["rows"][0]["protocol"],
                        f" Calibration: {result['calibration']}; the head and embedding are never pruned; "
                        "sparsity is over the decoder blocks' linear layers.")
    lines += ["", "SparseGPT's perplexity increase as a fraction of magnitude pruning's:", ""]
    lines += [f"- {r['pattern']} {r['sparsity']:.2f}: {r['sparsegpt_increase_pct']:.1f}% / "
              f"{r['magnitude_increase_pct']:.1f}% = **{r['ratio']:.2f}**" for r in result["sparsegpt_vs_magnitude"]]
    lines += ["", "prune s: wall seconds of the pruning call on the machine above, which may have run other jobs "
              "at the same time (a record, not a speed measurement).", "", "Speed: none. llmquant's kernels are dense; zeros cost the same time and memory as any weight "
              "until a sparse kernel reads the stored pattern (config.json `sparsity_config`)."]
    finish_report(out, stem, lines, lambda p: _plot_sparsity(result, p), quiet)


def _plot_sparsity(result: dict, path: Path) -> None:
    from llmquant.evals.sweep import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    dense = next(r["ppl"] for r in result["rows"] if r["method"] == "dense")
    for m in METHODS:
        pts = sorted((r["target_sparsity"], r["ppl"]) for r in result["rows"]
                     if r["method"] == m and r["pattern"] == "unstructured")
        if pts:
            ax.plot(*zip(*pts), "o-", label=f"{m} (unstructured)")
        nm = [(r["target_sparsity"], r["ppl"]) for r in result["rows"] if r["method"] == m and ":" in r["pattern"]]
        if nm:
            ax.plot(*zip(*nm), "x", ms=9, label=f"{m} (2:4)")
    ax.axhline(dense, color="gray", ls="--", lw=1, label="dense")
    ax.set_xlabel("sparsity of the decoder blocks' linear layers")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_yscale("log")
    ax.set_title(result["model"])
    ax.legend(fontsize=7)
    save_figure(fig, path)


# --- structured students --------------------------------------------------------------------------
def decode_speed(model, tok, new_tokens: int, runs: int) -> float:
    """Greedy decode tokens/s (median of ``runs``) after a short prompt, KV cache on, batch 1."""
    import torch

    ids = tok("The history of the town begins in", return_tensors="pt").input_ids
    times = []
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        for _ in range(runs):
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            times.append(time.perf_counter() - t0)
    return new_tokens / statistics.median(times)


def _block_weights(model) -> int:
    """Weights of the decoder blocks (a quantized layer counts its N x K weights, not its packed bytes)."""
    n = 0
    for mod in model.model.layers.modules():
        if hasattr(mod, "in_features") and hasattr(mod, "out_features"):
            n += mod.in_features * mod.out_features + (mod.bias.numel() if getattr(mod, "bias", None) is not None else 0)
        elif not list(mod.children()):
            n += sum(p.numel() for p in mod.parameters(recurse=False))
    return n


def run_students(args: argparse.Namespace) -> dict:
    import torch

    from llmquant.evals.machine import machine_info
    from llmquant.models import load_model

    rows = []
    entries = [("teacher", args.teacher)] + [tuple(s.split("=", 1)) for s in args.student]
    for label, path in entries:
        model, tok = load_model(path)
        block = _block_weights(model)
        r = _ppl(model, tok, args.teacher, args, label)
        tps = decode_speed(model, tok, args.new_tokens, args.runs)
        rec = Path(path) / "llmquant_training.json"
        rows.append(dict(r, run=label, path=str(path), block_params=block, decode_tokens_per_s=tps,
                         training=json.loads(rec.read_text()) if rec.exists() else None))
        print(f"{label}: ppl {r['ppl']:.2f}, {tps:.1f} tokens/s", flush=True)
        del model
        torch.manual_seed(0)
    t = rows[0]
    for r in rows:
        r["block_params_kept"] = r["block_params"] / t["block_params"]
        r["ppl_vs_teacher"] = r["ppl"] / t["ppl"]
        r["speedup"] = r["decode_tokens_per_s"] / t["decode_tokens_per_s"]
        if r["training"]:
            r["training"].pop("log", None)
    return {"label": args.label, "teacher": args.teacher, "machine": machine_info(), "rows": rows,
            "decode": {"new_tokens": args.new_tokens, "runs": args.runs, "dtype": "float32", "batch": 1,
                       "threads": torch.get_num_threads()}}


def write_students(result: dict, out: Path, quiet: bool = False) -> None:
    from llmquant.evals.perplexity import format_table, write_json
    from llmquant.evals.sweep import finish_report, report_head

    stem = f"pruning_students_{result['label']}"
    write_json(out / f"{stem}.json", result)
    table = format_table(result["rows"], [("run", "run"), ("block weights", "block_params"),
                                          ("kept", "block_params_kept"), ("ppl", "ppl"), ("ppl / teacher", "ppl_vs_teacher"),
                                          ("decode tok/s", "decode_tokens_per_s"), ("speed-up", "speedup")])
    d = result["decode"]
    lines = report_head(f"Structured pruning students: {result['label']}", result["machine"], table,
                        result["rows"][0]["protocol"],
                        f" Decode: greedy, batch {d['batch']}, {d['new_tokens']} new tokens after a short prompt, "
                        f"{d['dtype']}, {d['threads']} threads, median of {d['runs']} runs, all models in this run.")
    for r in result["rows"]:
        t = r.get("training")
        if t:
            lines.append(f"- {r['run']}: distilled {t.get('steps')} steps ({t.get('stopped_by')}), {t.get('tokens')} "
                         f"tokens, {t.get('tokens_per_s')} tokens/s, {t.get('wall_seconds', 0) / 60:.1f} min in all; "
                         f"config {json.dumps(t.get('distill_config', {}))}")
    finish_report(out, stem, lines, lambda p: _plot_students(result, p), quiet)


def _plot_students(result: dict, path: Path) -> None:
    from llmquant.evals.sweep import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for r in result["rows"]:
        ax.plot(r["block_params_kept"], r["ppl"], "o")
        ax.annotate(r["run"], (r["block_params_kept"], r["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("decoder-block parameters kept (fraction of the teacher's)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_yscale("log")
    ax.set_title(f"students of {result['teacher']}")
    save_figure(fig, path)


# --- gradual against one-shot ---------------------------------------------------------------------
def run_gradual(args: argparse.Namespace) -> dict:
    """One-shot (prune to the final size, then distill N steps) against gradual (``rounds`` prune ->
    distill rounds of N / rounds steps each, cubic schedule): same final size, same training steps,
    same text, same teacher targets. Structured (``--keep``, ``--axes``) or unstructured (``--method``,
    ``--sparsity``; the students keep their zeros while they train)."""
    import torch

    from llmquant.distill import DataConfig, DistillConfig, TrainConfig, distill
    from llmquant.evals.machine import machine_info
    from llmquant.models import load_model
    from llmquant.prune import SparsityConfig, StructuredConfig
    from llmquant.prune.gradual import gradual
    from llmquant.prune.jobs import prune

    sparse = args.method is not None
    size = f"{args.method}{args.sparsity}" if sparse else f"keep{args.keep}"
    work = args.work / f"gradual-{args.model}-{size}"
    work.mkdir(parents=True, exist_ok=True)
    final = (SparsityConfig(method=args.method, sparsity=args.sparsity) if sparse
             else StructuredConfig(keep=args.keep, axes=tuple(args.axes.split(","))))
    dcfg = DistillConfig(train=TrainConfig(steps=args.steps, eval_every=0), lr=args.lr,
                         data=DataConfig(source=args.data, heldout=8))
    cache = str(work / "teacher_topk.safetensors")
    times = {}
    if not (work / "oneshot").exists():
        t0 = time.perf_counter()
        if not (work / "oneshot-pruned").exists():
            prune(args.model, str(work / "oneshot-pruned"), final, progress=False)
        distill(args.model, str(work / "oneshot-pruned"), str(work / "oneshot"), dcfg, teacher_cache=cache)
        times["oneshot"] = time.perf_counter() - t0
    g = None
    if not (work / "gradual").exists():
        t0 = time.perf_counter()
        g = gradual(args.model, str(work / "gradual"), final, dcfg, args.rounds, kind=args.schedule, teacher_cache=cache)
        times["gradual"] = time.perf_counter() - t0
    rows = []
    for label, path in (("teacher", args.model), ("one-shot", str(work / "oneshot")), ("gradual", str(work / "gradual"))):
        model, tok = load_model(path)
        block = _block_weights(model)
        rows.append(dict(_ppl(model, tok, args.model, args, label), run=label, block_params=block,
                         sparsity=_block_sparsity(model),
                         shape={"layers": model.config.num_hidden_layers, "heads": model.config.num_attention_heads,
                                "kv_heads": model.config.num_key_value_heads,
                                "intermediate": model.config.intermediate_size}))
        del model
        torch.manual_seed(0)
    for r in rows:
        r["block_params_kept"] = r["block_params"] / rows[0]["block_params"]
    gp = work / "gradual" / "llmquant_gradual.json"
    return {"label": f"{args.model}-{size}", "model": args.model, "machine": machine_info(), "rows": rows,
            "kind": "unstructured" if sparse else "structured", "target": final.to_dict(),
            "steps": args.steps, "rounds": args.rounds, "schedule": args.schedule,
            "axes": None if sparse else args.axes,
            "lr": args.lr, "data": args.data, "seconds": times,
            "gradual": json.loads(gp.read_text()) if gp.exists() else g}


def _block_sparsity(model) -> float:
    """Fraction of exact zeros in the weights of the decoder blocks' linear layers."""
    from llmquant.modules.walk import find_linear_layers, linear_weight
    from llmquant.quantizers.blocks import find_layer_stack

    stack, layers = find_layer_stack(model)
    ws = [linear_weight(m) for _, m in find_linear_layers(layers, prefix=stack)]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def write_gradual(result: dict, out: Path, quiet: bool = False) -> None:
    from llmquant.evals.perplexity import format_table, write_json
    from llmquant.evals.sweep import finish_report, report_head

    stem = f"pruning_gradual_{result['label']}"
    write_json(out / f"{stem}.json", result)
    sparse = result.get("kind") == "unstructured"
    table = format_table(result["rows"], [("run", "run"), ("block params kept", "block_params_kept"),
                                          ("zeros in block linears", "sparsity"), ("ppl", "ppl")])
    what = (f"method {result['target']['method']} to {result['target']['sparsity']} sparsity (unstructured; "
            "the zeros stay zero while the students train)" if sparse else f"axes {result['axes']}")
    lines = report_head(f"Gradual against one-shot {'unstructured' if sparse else 'structured'} pruning: "
                        f"{result['model']}", result["machine"], table, result["rows"][0]["protocol"],
                        f" Both students: {what}, distilled {result['steps']} steps in all "
                        f"(gradual: {result['rounds']} rounds of {result['steps'] // result['rounds']}, "
                        f"{result['schedule']} schedule), lr {result['lr']}, text {result['data']!r}, "
                        "batch 1 x 4 windows of 256 tokens, 8-bit AdamW, the same teacher targets.")
    g = result.get("gradual") or {}
    for h in g.get("history", []):
        size = (f"{100 * h['sparsity']:.1f}% zeros" if "sparsity" in h
                else f"{100 * h['kept_fraction']:.1f}% of the block parameters, shape {h['shape']}")
        lines.append(f"- round {h['round']}: {size}, held-out loss {(h.get('heldout_last') or {}).get('loss')}")
    finish_report(out, stem, lines, lambda p: None, quiet)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="job", required=True)
    s = sub.add_parser("sparsity")
    s.add_argument("--model", default="gemma3-270m")
    s.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    s.add_argument("--sparsity", type=float, nargs="*", default=[0.5])
    s.add_argument("--nm", default="2:4", help="N:M pattern also run (empty: none)")
    t = sub.add_parser("students")
    t.add_argument("--teacher", required=True)
    t.add_argument("--student", action="append", default=[], help="LABEL=FOLDER (repeatable)")
    t.add_argument("--label", required=True)
    t.add_argument("--new-tokens", type=int, default=64)
    t.add_argument("--runs", type=int, default=5)
    g = sub.add_parser("gradual")
    g.add_argument("--model", default="smollm2-135m")
    g.add_argument("--keep", type=float, default=0.6, help="structured: final kept fraction")
    g.add_argument("--axes", default="layers", help="structured: what may shrink")
    g.add_argument("--method", choices=METHODS, help="unstructured pruning with this method (instead of structured)")
    g.add_argument("--sparsity", type=float, default=0.5, help="with --method: final sparsity")
    g.add_argument("--rounds", type=int, default=3)
    g.add_argument("--schedule", default="cubic")
    g.add_argument("--steps", type=int, default=90)
    g.add_argument("--lr", type=float, default=2e-4)
    g.add_argument("--data", default="news+pydoc")
    g.add_argument("--work", type=Path, default=Path("pruning-work"), help="folder for the students")
    for q in (s, t, g):
        q.add_argument("--corpus")
        q.add_argument("--context", type=int, default=512)
        q.add_argument("--max-tokens", type=int, default=8192)
        q.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    command = "python -m llmquant.evals.pruning " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.job == "sparsity":
        result = run_sparsity(args)
        result["command"] = result["machine"]["command"] = command
        write_sparsity(result, args.out)
    elif args.job == "students":
        result = run_students(args)
        result["command"] = result["machine"]["command"] = command
        write_students(result, args.out)
    else:
        result = run_gradual(args)
        result["command"] = result["machine"]["command"] = command
        write_gradual(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
