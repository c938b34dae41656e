"""Perplexity of RTN and GPTQ at several bit widths against the float model: one command regenerates
the table (markdown + JSON) and the plot under ``evals/results/``.

    python -m llmquant.evals.sweep --model gemma3-270m --bits 3 4 8 --methods rtn gptq

Every row carries the evaluation protocol and the quantization settings (calibration source,
samples, sequence length, seed), so the numbers can be compared and reproduced.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def run(args: argparse.Namespace) -> dict:
    import llmquant
    from llmquant.calibration import calibration_batches
    from llmquant.evals.perplexity import perplexity
    from llmquant.models import bos_for_raw_text, load_model

    proto = dict(corpus=args.corpus, context=args.context, max_tokens=args.max_tokens)
    model, tok = load_model(args.model)
    bos = bos_for_raw_text(args.model, tok)
    rows = [dict(perplexity(model, tok, bos=bos, label="float", **proto), method="float", bits=16)]
    del model
    calibration = None
    for bits in args.bits:
        for method in args.methods:
            model, _ = load_model(args.model)
            cfg = llmquant.QuantConfig(bits=bits, group_size=args.group_size, method=method,
                                       act_order=args.act_order if method == "gptq" else None,
                                       clip_search=args.clip_search if method == "gptq" else None)
            if method == "gptq" and calibration is None:
                calibration = calibration_batches(tok, source=args.calibration, nsamples=args.nsamples,
                                                  seqlen=args.seqlen, seed=args.seed, bos=bos)
            t0 = time.perf_counter()
            llmquant.quantize(model, cfg, calibration=calibration if method == "gptq" else None)
            qtime = time.perf_counter() - t0
            r = perplexity(model, tok, bos=bos, label=f"{method} int{bits} g{args.group_size}", **proto)
            r.update(method=method, bits=bits, group_size=args.group_size, quantize_seconds=qtime,
                     config=cfg.to_dict())
            if method == "gptq":
                r["calibration"] = dict(source=args.calibration, nsamples=args.nsamples, seqlen=args.seqlen,
                                        seed=args.seed)
            rows.append(r)
            del model
            if args.out is not None:  # keep what is measured so far, should a later step fail
                write(_summarize(args.model, rows, args.bits), args.out, quiet=True)
    return _summarize(args.model, rows, args.bits)


def _summarize(model: str, rows: list[dict], bit_widths: list[int]) -> dict:
    base = rows[0]["ppl"]
    for r in rows:
        r["ppl_increase_pct"] = 100 * (r["ppl"] / base - 1)
    gaps = {}
    for bits in bit_widths:
        by = {r["method"]: r for r in rows if r["bits"] == bits}
        if "rtn" in by and "gptq" in by and by["rtn"]["ppl"] > base:
            gaps[bits] = {
                "gap_closed_pct": 100 * (by["rtn"]["ppl"] - by["gptq"]["ppl"]) / (by["rtn"]["ppl"] - base),
                "gptq_increase_over_rtn_increase": (by["gptq"]["ppl"] - base) / (by["rtn"]["ppl"] - base),
            }
    from llmquant.evals.machine import machine_info

    return {"model": model, "machine": machine_info(), "rows": rows, "gptq_vs_rtn": gaps}


def write(result: dict, out: Path, quiet: bool = False) -> None:
    from llmquant.evals.perplexity import format_table, write_json

    out.mkdir(parents=True, exist_ok=True)
    stem = f"ppl_vs_bits_{result['model']}"
    write_json(out / f"{stem}.json", result)
    p = result["rows"][0]["protocol"]
    table = format_table(result["rows"], [("method", "method"), ("bits", "bits"), ("ppl", "ppl"),
                                          ("Δ ppl %", "ppl_increase_pct"), ("tokens scored", "tokens_scored"),
                                          ("quantize s", "quantize_seconds")])
    m = result["machine"]
    lines = report_head(f"Perplexity vs bits: {result['model']}", m, table, p)
    gptq = next((r for r in result["rows"] if "calibration" in r), None)
    if gptq:
        calib, cfg = gptq["calibration"], gptq["config"]
        source = calib["source"] + (" (the news corpus)" if calib["source"] == "builtin" else "")
        lines.append(f"GPTQ: act_order {cfg['act_order']}, clip_search {cfg['clip_search']}, damp_percent "
                     f"{cfg['damp_percent']}, block_size {cfg['block_size']}, true_sequential {cfg['true_sequential']}; "
                     f"calibration: {source}, {calib['nsamples']} × {calib['seqlen']} tokens, seed {calib['seed']}. "
                     "RTN: the same scheme, ranges from min/max.")
    for bits, g in result["gptq_vs_rtn"].items():
        lines.append(f"INT{bits}: GPTQ closes {g['gap_closed_pct']:.1f}% of RTN's perplexity gap to float "
                     f"(its increase is {g['gptq_increase_over_rtn_increase']:.2f}× RTN's).")
    finish_report(out, stem, lines, lambda path: _plot(result, path), quiet)


def report_head(title: str, m: dict, table: str, p: dict, protocol_extra: str = "") -> list[str]:
    """The first lines of a results page: title, command and machine, the table, the protocol."""
    return [
        f"# {title}",
        "",
        f"`{m['command']}` ({m['date']}, commit {m['commit']}; {m['cpu']}, {m['cores']} cores, kernels "
        f"{m['kernels_isa']}, torch {m['torch']}, {m['threads']} threads)",
        "",
        table,
        "",
        f"Protocol: WikiText-2 raw test (sha256 {p['corpus_sha256']}), first {p['max_tokens']} tokens, "
        f"context {p['context']}, stride {p['stride']}, BOS {p['bos']}." + protocol_extra,
    ]


def finish_report(out: Path, stem: str, lines: list[str], plot, quiet: bool) -> None:
    """Write ``<stem>.md`` (atomically), print it unless ``quiet``, and draw ``<stem>.png`` with ``plot(path)``."""
    from llmquant.fsutil import atomic_write_text

    atomic_write_text(out / f"{stem}.md", "\n".join(lines) + "\n")
    if not quiet:
        print("\n".join(lines))
    plot(out / f"{stem}.png")


def _plot(result: dict, path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    base = result["rows"][0]["ppl"]
    for method, marker in (("rtn", "o"), ("gptq", "s")):
        pts = sorted((r["bits"], r["ppl"]) for r in result["rows"] if r["method"] == method)
        if pts:
            ax.plot(*zip(*pts), marker=marker, label=method.upper())
    ax.axhline(base, color="gray", linestyle="--", label="float")
    ax.set_xlabel("bits per weight (group 128)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_yscale("log")
    ax.set_title(result["model"])
    ax.legend()
    save_figure(fig, path)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or a clear error naming the extra to install."""
    try:
        import matplotlib
    except ImportError:
        raise ModuleNotFoundError("plots need matplotlib: pip install 'llmquant[eval]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure atomically (a temporary file, then a rename)."""
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--bits", type=int, nargs="+", default=[3, 4, 8])
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq"], choices=["rtn", "gptq"])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ act-order (default: GPTQ's default, on)")
    p.add_argument("--clip-search", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ clipping search (default: GPTQ's default, on)")
    return sweep_main(p, argv, run, write)


def sweep_main(p: argparse.ArgumentParser, argv: list[str] | None, run_fn, write_fn, out: Path = DEFAULT_OUT) -> int:
    """The rest of a sweep's ``main``: the shared protocol options (results under ``out``), parse ``argv``,
    INFO logging, torch's seed fixed, ``write_fn(run_fn(args), args.out)``."""
    add_protocol_args(p, out)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    write_fn(run_fn(args), args.out)
    return 0


def add_protocol_args(p: argparse.ArgumentParser, out: Path = DEFAULT_OUT) -> None:
    """The evaluation protocol and calibration options every sweep shares."""
    p.add_argument("--corpus")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--calibration", default="builtin")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=out)


if __name__ == "__main__":
    raise SystemExit(main())
