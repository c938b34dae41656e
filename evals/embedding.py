"""The embedding table and the output layer in the budget: whole-checkpoint size and perplexity of GPTQ
INT4 g128 with the tied embedding/head table in float (as in every other result) against the same with
the table quantized too (``quantize_embedding`` + ``quantize_lm_head``: one shared 4-bit table), and
mixed precision under a whole-checkpoint size budget whose allocation chooses the table's scheme too.

    python -m llmquant.evals.embedding --model gemma3-270m

Bytes are the safetensors files of the saved checkpoint (every tensor, float ones in fp16), against
the safetensors files of the model's own fp16 checkpoint. Table (markdown), JSON and plot under ``evals/results/``.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def run(args: argparse.Namespace) -> dict:
    import llmquant
    from llmquant.calibration import calibration_batches
    from llmquant.evals.pareto import quantized_layer_stats
    from llmquant.evals.perplexity import perplexity
    from llmquant.models import bos_for_raw_text, load_model

    proto = dict(corpus=args.corpus, context=args.context, max_tokens=args.max_tokens)
    tmp = Path(tempfile.mkdtemp(prefix="llmquant-embedding-"))
    model, tok = load_model(args.model)
    bos = bos_for_raw_text(args.model, tok)
    fp16_bytes = checkpoint_bytes(Path(model.name_or_path))  # the package's fp16 checkpoint files
    rows = [dict(perplexity(model, tok, bos=bos, label="float (fp16 checkpoint)", **proto), checkpoint_bytes=fp16_bytes)]
    del model
    calibration = calibration_batches(tok, source=args.calibration, nsamples=args.nsamples, seqlen=args.seqlen,
                                      seed=args.seed, bos=bos)
    calib = dict(source=args.calibration, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    base = llmquant.QuantConfig(bits=4, group_size=128, method="gptq")
    table = dict(quantize_lm_head=True, quantize_embedding=True)
    runs = [("gptq int4 g128, table float", base)] if args.baseline else []
    runs += [(f"gptq int4 g{g}, table int4 g{g} (shared by embedding and head)",
              base.replace(group_size=g, **table)) for g in args.table_group_sizes]
    runs += [(f"mixed, max_size {f:.0%} of fp16 (table allocated too)",
              base.replace(max_size=int(f * fp16_bytes), **table)) for f in args.size_fractions]
    for i, (label, cfg) in enumerate(runs):
        model, _ = load_model(args.model)
        t0 = time.perf_counter()
        summary = llmquant.quantize(model, cfg, calibration=calibration)
        seconds = time.perf_counter() - t0
        r = perplexity(model, tok, bos=bos, label=label, **proto)
        saved = llmquant.save_quantized(model, tmp / f"q{i}")
        r.update(quantized_layer_stats(model), quantize_seconds=seconds, config=summary["quantization_config"],
                 calibration=calib, checkpoint_bytes=checkpoint_bytes(saved))
        if "mixed" in summary:
            r["mixed"] = summary["mixed"]
            emb = summary["quantization_config"]["overrides"]
            r["table_scheme"] = next((v for k, v in emb if k.endswith("embed_tokens")), None)
        rows.append(r)
        del model
        if args.out is not None:
            write(_summarize(args.model, rows, fp16_bytes), args.out, quiet=True)
    return _summarize(args.model, rows, fp16_bytes)


def _summarize(model: str, rows: list[dict], fp16_bytes: int) -> dict:
    from llmquant.evals.machine import machine_info

    base = rows[0]["ppl"]
    ref = next((r["ppl"] for r in rows if r["model"].endswith("table float")), None)
    for r in rows:
        r["ppl_increase_pct"] = 100 * (r["ppl"] / base - 1)
        r["vs_gptq_table_float_pct"] = 100 * (r["ppl"] / ref - 1) if ref else None
        r["of_fp16_checkpoint"] = r["checkpoint_bytes"] / fp16_bytes
        r["checkpoint_mib"] = r["checkpoint_bytes"] / 2**20
        qc = r.get("config") or {}
        if qc.get("quantize_embedding"):
            t = r.get("table_scheme") or {}
            bits, g = t.get("bits", qc["bits"]), t.get("group_size", qc["group_size"])
            r["table"] = f"int{bits} g{g}" + ("" if t.get("sym", qc["sym"]) else " asym")
        else:
            r["table"] = "fp16" if "config" in r else ""
    return {"model": model, "machine": machine_info(), "fp16_checkpoint_bytes": fp16_bytes, "rows": rows}


def write(result: dict, out: Path, quiet: bool = False) -> None:
    from llmquant.evals.perplexity import format_table, write_json
    from llmquant.evals.sweep import finish_report, report_head

    out.mkdir(parents=True, exist_ok=True)
    stem = f"embedding_{result['model']}"
    write_json(out / f"{stem}.json", result)
    rows = result["rows"]
    table = format_table(rows, [("run", "model"), ("checkpoint MiB", "checkpoint_mib"),
                                ("of fp16 checkpoint", "of_fp16_checkpoint"), ("table", "table"), ("ppl", "ppl"),
                                ("Δ ppl % vs float", "ppl_increase_pct"),
                                ("Δ ppl % vs table float", "vs_gptq_table_float_pct"),
                                ("quantize s", "quantize_seconds")])
    lines = report_head(
        f"Embedding and output layer quantized: {result['model']}", result["machine"], table, rows[0]["protocol"],
        " Checkpoint bytes: the safetensors files as saved (float tensors fp16), against the files of the model's fp16 "
        "checkpoint. GPTQ: act-order and clip search on; a table shared by the embedding and the tied head is quantized "
        "by GPTQ as the head (act-order groups fixed up front, no perm) and stored once. Mixed: the allocation chooses "
        "every block linear's scheme and the table's under max_size (the whole checkpoint, headers included).")
    q = next((r for r in rows if "calibration" in r), None)
    if q:
        c = q["calibration"]
        lines.append(f"Calibration (disjoint from the evaluation text): {c['source']}, {c['nsamples']} × {c['seqlen']} "
                     f"tokens, seed {c['seed']}.")
    finish_report(out, stem, lines, lambda path: _plot(result, path), quiet)


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in result["rows"]:
        ax.scatter(r["checkpoint_mib"], r["ppl"])
        ax.annotate(r["model"].split(" (")[0], (r["checkpoint_mib"], r["ppl"]), fontsize=7)
    ax.set_xlabel("checkpoint MiB")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_title(f"{result['model']}: size with the embedding table quantized")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from llmquant.evals.sweep import sweep_main

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--table-group-sizes", type=int, nargs="*", default=[128],
                   help="uniform GPTQ INT4 runs with the whole model, table included, at these group sizes")
    p.add_argument("--size-fractions", type=float, nargs="*", default=[0.35],
                   help="mixed runs: max_size as these fractions of the fp16 checkpoint's bytes")
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="skip GPTQ INT4 g128 with the table in float (evals/results/pareto_* has it, same protocol)")
    return sweep_main(p, argv, run, write, DEFAULT_OUT)


if __name__ == "__main__":
    raise SystemExit(main())
