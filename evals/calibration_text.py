"""Which calibration text: the same GPTQ run calibrated on each text, scored on WikiText-2 and on a
text of another domain, so a gain that is only the calibration text resembling the evaluation text
shows as such.

    python -m llmquant.evals.calibration_text --model gemma3-270m --bits 3 --rotation hadamard \\
        --float-targets --compact-qparams --calibrations builtin wiki

Every quantized model is scored on two texts, each its first ``--max-tokens`` tokens in windows of
``--context`` (the WikiText-2 protocol of the other sweeps):

* ``wikitext2``: WikiText-2 raw test, as everywhere;
* ``pydoc``: the English prose of the Python documentation's topic pages (``pydoc_data.topics``, the
  ``"pydoc"`` calibration source of :mod:`llmquant.calibration`, its documents joined by a blank line):
  technical text unlike both the news corpus and Wikipedia. It follows the Python version, which the
  results record with the text's sha256.

Table (markdown), JSON and plot under ``evals/results/``.
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
TEXTS = ("wikitext2", "pydoc")


def _pydoc_file(tmp: Path) -> Path:
    from llmquant.calibration import pydoc_documents

    path = tmp / "pydoc.txt"
    path.write_text("\n\n".join(pydoc_documents()), encoding="utf-8")
    return path


def run(args: argparse.Namespace) -> dict:
    if args.calibration != "builtin":
        raise SystemExit(f"--calibration {args.calibration}: this sweep compares sources; name them with --calibrations")
    with tempfile.TemporaryDirectory(prefix="llmquant-caltext-") as tmp:  # the pydoc text, removed after
        return _run(args, _pydoc_file(Path(tmp)))


def _run(args: argparse.Namespace, pydoc_path: Path) -> dict:
    import llmquant
    from llmquant.calibration import calibration_batches
    from llmquant.evals.pareto import quantized_layer_stats
    from llmquant.evals.perplexity import perplexity
    from llmquant.models import bos_for_raw_text, load_model

    texts = {"wikitext2": args.corpus, "pydoc": pydoc_path}
    proto = dict(context=args.context, max_tokens=args.max_tokens)
    model, tok = load_model(args.model)
    bos = bos_for_raw_text(args.model, tok)
    rows = []

    def score(m, label: str, **extra) -> None:
        for name, corpus in texts.items():
            r = perplexity(m, tok, bos=bos, corpus=corpus, label=f"{label} on {name}", **proto)
            rows.append(dict(r, run=label, text=name, **extra))
        if args.out is not None:  # keep what is measured so far, should a later step fail
            write(_summarize(args, rows), args.out, quiet=True)

    score(model, "float")
    del model
    extra = {}
    if args.rotation:
        extra["rotation"] = args.rotation
    if args.float_targets:
        extra["float_targets"] = True
    if args.compact_qparams:
        extra["compact_qparams"] = True
    for source in args.calibrations:
        model, _ = load_model(args.model)
        calibration = calibration_batches(tok, source=source, nsamples=args.nsamples, seqlen=args.seqlen,
                                          seed=args.seed, bos=bos)
        cfg = llmquant.QuantConfig(bits=args.bits, group_size=args.group_size, method="gptq", **extra)
        t0 = time.perf_counter()
        summary = llmquant.quantize(model, cfg, calibration=calibration)
        seconds = time.perf_counter() - t0
        score(model, f"gptq int{args.bits} g{args.group_size}, calibrated on {source}", calibration=dict(
            source=source, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed), quantize_seconds=seconds,
            config=summary["quantization_config"], **quantized_layer_stats(model))
        del model
    return _summarize(args, rows)


def _summarize(args: argparse.Namespace, rows: list[dict]) -> dict:
    from llmquant.evals.machine import machine_info

    base = {r["text"]: r["ppl"] for r in rows if r["run"] == "float"}
    for r in rows:
        r["ppl_increase_pct"] = 100 * (r["ppl"] / base[r["text"]] - 1)
    settings = dict(bits=args.bits, group_size=args.group_size, rotation=args.rotation,
                    float_targets=args.float_targets, compact_qparams=args.compact_qparams)
    return {"model": args.model, "machine": machine_info(), "python": platform.python_version(),
            "settings": settings, "tag": args.tag, "rows": rows}


def write(result: dict, out: Path, quiet: bool = False) -> None:
    from llmquant.evals.perplexity import write_json
    from llmquant.evals.sweep import finish_report

    out.mkdir(parents=True, exist_ok=True)
    stem = f"calibration_text_{result['model']}" + (f"-{result['tag']}" if result.get("tag") else "")
    write_json(out / f"{stem}.json", result)
    rows = result["rows"]
    runs = list(dict.fromkeys(r["run"] for r in rows))
    texts = [t for t in TEXTS if any(r["text"] == t for r in rows)]
    by = {(r["run"], r["text"]): r for r in rows}
    head = "| run | " + " | ".join(f"{t} ppl | Δ %" for t in texts) + " | quantize s |"
    lines_t = [head, "|---|" + "---|---|" * len(texts) + "---|"]
    for run in runs:
        cells = []
        for t in texts:
            r = by.get((run, t))
            cells += [f"{r['ppl']:.2f}", f"{r['ppl_increase_pct']:.1f}"] if r else ["", ""]
        secs = next((by[(run, t)].get("quantize_seconds") for t in texts if (run, t) in by), None)
        lines_t.append(f"| {run} | " + " | ".join(cells) + f" | {'' if secs is None else f'{secs:.0f}'} |")
    m = result["machine"]
    s = result["settings"]
    opts = ", ".join(k for k in ("float_targets", "compact_qparams") if s.get(k)) or "none"
    lines = [
        f"# Calibration text: {result['model']}",
        "",
        f"`{m['command']}` ({m['date']}, commit {m['commit']}; {m['cpu']}, {m['cores']} cores, kernels "
        f"{m['kernels_isa']}, torch {m['torch']}, Python {result['python']}, {m['threads']} threads)",
        "",
        *lines_t,
        "",
    ]
    for t in texts:
        p = next(r["protocol"] for r in rows if r["text"] == t)
        what = "WikiText-2 raw test" if t == "wikitext2" else "Python documentation topics prose (pydoc_data.topics)"
        lines.append(f"Text {t}: {what} (sha256 {p['corpus_sha256']}), first {p['max_tokens']} tokens, context "
                     f"{p['context']}, stride {p['stride']}, BOS {p['bos']}.")
    q = next((r for r in rows if "calibration" in r), None)
    if q:
        c = q["calibration"]
        lines.append(f"GPTQ INT{s['bits']} g{s['group_size']}, act-order and clip search on, rotation "
                     f"{s['rotation'] or 'none'}, options: {opts}. Calibration: {c['nsamples']} × {c['seqlen']} "
                     f"tokens, seed {c['seed']}, from the source each row names (llmquant.calibration: builtin = "
                     "the news corpus, wiki = 106 Wikipedia articles disjoint from WikiText-2's test articles).")
    finish_report(out, stem, lines, lambda path: _plot(result, path), quiet)


def _plot(result: dict, path: Path) -> None:
    from llmquant.evals.sweep import pyplot, save_figure

    plt = pyplot()
    rows = [r for r in result["rows"] if r["run"] != "float"]
    runs = list(dict.fromkeys(r["run"] for r in rows))
    texts = [t for t in TEXTS if any(r["text"] == t for r in rows)]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    width = 0.8 / max(1, len(runs))
    for i, run in enumerate(runs):
        ys = [next((r["ppl_increase_pct"] for r in rows if r["run"] == run and r["text"] == t), 0.0) for t in texts]
        ax.bar([j + i * width for j in range(len(texts))], ys, width, label=run.split("calibrated on ")[-1])
    ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(texts))], texts)
    ax.set_ylabel("perplexity increase over float, %")
    ax.set_title(f"{result['model']}: calibration text")
    if runs:
        ax.legend(title="calibrated on")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    from llmquant.evals.sweep import sweep_main

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--rotation", choices=["hadamard"], help="rotate the layers' inputs (QuantConfig.rotation)")
    p.add_argument("--float-targets", action="store_true", help="QuantConfig.float_targets")
    p.add_argument("--compact-qparams", action="store_true", help="QuantConfig.compact_qparams")
    p.add_argument("--calibrations", nargs="+", default=["builtin", "wiki"],
                   help="calibration sources to compare (llmquant.calibration)")
    p.add_argument("--tag", help="appended to the result files' names")
    return sweep_main(p, argv, run, write, DEFAULT_OUT)


if __name__ == "__main__":
    raise SystemExit(main())
