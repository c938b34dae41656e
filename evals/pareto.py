"""Perplexity against bits per weight: uniform RTN and GPTQ at fixed bit widths, and mixed precision
(:mod:`llmquant.mixed`) at several budgets. One command writes the table (markdown), the JSON and the
plot under ``evals/results/``:

    python -m llmquant.evals.pareto --model gemma3-270m

Bits per weight count everything the quantized layers store (codes, scales, zeros, act-order perm)
over their weights; the embedding and the output layer stay as in the uniform runs (float, tied). The
mixed runs share one measurement (measured once, its time reported apart), so each budget's time is
allocation + GPTQ; ``mixed_total_seconds`` of the first budget adds the measurement.
``--probe-sequences``/``--probe-positions`` make that measurement up front with more (or less) KL-probe
data than the library's default (one sequence, 128 positions); its time is then reported apart.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DEFAULT_BUDGETS = [2.5, 3.0, 3.25, 3.5, 3.75, 4.125, 4.5]


def quantized_layer_stats(model: torch.nn.Module) -> dict:
    """Bytes and weights of the model's quantized layers, and the bits per weight they make."""
    from llmquant.modules.quant_linear import QuantLinear

    nbytes = weights = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            nbytes += m.weight_bytes()
            weights += m.in_features * m.out_features
    return {"layer_bytes": nbytes, "weights": weights, "bpw": 8 * nbytes / weights if weights else None}


def run(args: argparse.Namespace) -> dict:
    import llmquant
    from llmquant.calibration import calibration_batches
    from llmquant.evals.perplexity import perplexity
    from llmquant.models import bos_for_raw_text, load_model

    probe = {k: v for k, v in (("probe_sequences", getattr(args, "probe_sequences", None)),
                               ("probe_positions", getattr(args, "probe_positions", None))) if v is not None}
    if probe and args.measurement:
        raise SystemExit(f"--probe-sequences/--probe-positions make a new measurement; --measurement {args.measurement} "
                         "reuses one made with its own probe settings: give one or the other")
    proto = dict(corpus=args.corpus, context=args.context, max_tokens=args.max_tokens)
    model, tok = load_model(args.model)
    bos = bos_for_raw_text(args.model, tok)
    rows = [dict(perplexity(model, tok, bos=bos, label="float", **proto), method="float", bits=16, bpw=16.0)]
    del model
    calibration = calibration_batches(tok, source=args.calibration, nsamples=args.nsamples, seqlen=args.seqlen,
                                      seed=args.seed, bos=bos)
    calib = dict(source=args.calibration, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    rot = getattr(args, "rotation", None)  # callers that build args by hand may leave it out
    ft = bool(getattr(args, "float_targets", False))
    gptq_opts = {"float_targets": True} if ft else {}  # RTN has no float targets
    compact = bool(getattr(args, "compact_qparams", False))
    store = {"compact_qparams": True} if compact else {}  # every quantized row's storage
    opt_tag = (" +float-targets" if ft else "") + (" +compact" if compact else "")  # the unrotated rows' too
    tag = (f" +{rot}" if rot else "") + opt_tag

    def one(label: str, cfg, **extra) -> dict:
        model, _ = load_model(args.model)
        t0 = time.perf_counter()
        summary = llmquant.quantize(model, cfg, calibration=calibration if cfg.method == "gptq" or cfg.budgeted else None,
                                    measurement=extra.pop("measurement", None))
        seconds = time.perf_counter() - t0
        r = perplexity(model, tok, bos=bos, label=label, **proto)
        r.update(quantized_layer_stats(model), quantize_seconds=seconds, config=summary["quantization_config"],
                 calibration=calib, **extra)
        if "mixed" in summary:
            r["mixed"] = summary["mixed"]
        rows.append(r)
        if args.out is not None:  # keep what is measured so far, should a later step fail
            write(_summarize(args.model, rows, rot, _tag(args), ft, compact), args.out, quiet=True)
        return r

    for bits in args.uniform_bits:
        for method in args.methods:
            cfg = llmquant.QuantConfig(bits=bits, group_size=128, method=method, rotation=rot, **store,
                                       **(gptq_opts if method == "gptq" else {}))
            one(f"{method} int{bits} g128{tag}", cfg, method=method, bits=bits, rotation=rot)
    for bits in getattr(args, "plain_gptq_bits", None) or []:  # the unrotated baselines, in the same run
        one(f"gptq int{bits} g128{opt_tag}",
            llmquant.QuantConfig(bits=bits, group_size=128, method="gptq", **gptq_opts, **store),
            method="gptq-plain",
            bits=bits, rotation=None)
    meas_path = args.measurement or (args.out / f"measurement_{args.model}{'-' + rot if rot else ''}{_tag(args)}.json"
                                     if args.out else None)
    if meas_path is not None and Path(meas_path).exists() and not args.measurement:
        Path(meas_path).unlink()  # measured anew in this run, so its time is this machine's
    if probe and args.budgets:  # measured here, with the probe settings asked for
        if meas_path is None:
            raise SystemExit("--probe-sequences/--probe-positions need --out (the measurement file is written there)")
        from llmquant.mixed.cost import candidates
        from llmquant.mixed.measure import measure

        model, _ = load_model(args.model)
        cfg = llmquant.QuantConfig(method="gptq", target_bpw=args.budgets[0], rotation=rot, **store)
        meas = measure(model, cfg, calibration, candidates(cfg.mixed_bits, cfg.mixed_group_sizes), **probe)
        meas.save(meas_path)
        del model
        rows[0]["measurement"] = dict(probe, seconds=meas.seconds, calibration=meas.calibration)
    for i, budget in enumerate(args.budgets):
        cfg = llmquant.QuantConfig(method="gptq", target_bpw=budget, rotation=rot, **gptq_opts, **store)
        r = one(f"mixed {budget} bpw{tag}", cfg, method="mixed", bits=None, target_bpw=budget, measurement=meas_path,
                rotation=rot)
        r["mixed_total_seconds"] = r["quantize_seconds"]
    return _summarize(args.model, rows, rot, _tag(args), ft, compact)


def _tag(args: argparse.Namespace) -> str:
    tag = getattr(args, "tag", None)
    return f"-{tag}" if tag else ""


def _summarize(model: str, rows: list[dict], rotation: str | None = None, tag: str = "",
               float_targets: bool = False, compact: bool = False) -> dict:
    from llmquant.evals.machine import machine_info

    base = rows[0]["ppl"]
    for r in rows:
        r["ppl_increase_pct"] = 100 * (r["ppl"] / base - 1)
    out = {"model": model, "machine": machine_info(), "rows": rows}
    if rotation:
        out["rotation"] = rotation
    if tag:
        out["tag"] = tag
    if float_targets:
        out["float_targets"] = True
    if compact:
        out["compact_qparams"] = True
    return out


def write(result: dict, out: Path, quiet: bool = False) -> None:
    from llmquant.evals.perplexity import format_table, write_json
    from llmquant.evals.sweep import finish_report, report_head

    out.mkdir(parents=True, exist_ok=True)
    stem = f"pareto_{result['model']}" + (f"-{result['rotation']}" if result.get("rotation") else "") + result.get("tag", "")
    write_json(out / f"{stem}.json", result)
    rows = result["rows"]
    for r in rows:
        m = r.get("mixed")
        r["measure_s"] = m["seconds"]["measure"] if m and m["seconds"]["measure"] > 1 else ""
        bits = m["allocation"]["layers_by_bits"] if m else None
        r["layers by bits"] = " ".join(f"{k.split('-')[0]}:{v}" for k, v in bits.items()) if bits else ""
    table = format_table(rows, [("run", "model"), ("bpw", "bpw"), ("ppl", "ppl"), ("Δ ppl %", "ppl_increase_pct"),
                                ("quantize s", "quantize_seconds"), ("of which measure s", "measure_s"),
                                ("layers by bits", "layers by bits")])
    m = result["machine"]
    p = rows[0]["protocol"]
    lines = report_head(
        f"Perplexity vs bits per weight: {result['model']}", m, table, p,
        " bpw: bytes of the quantized layers (codes, scales, zeros, act-order perm, rotation signs) × 8 / their weights; "
        "embedding and output layer in float as in every row. GPTQ rows and mixed rows: act-order and clip search on"
        + (", and float targets ('+float-targets': QuantConfig.float_targets, each layer aims at the float model's "
           "outputs)." if result.get("float_targets") else ".")
        + (f" '+{result['rotation']}': the layers' inputs rotated (QuantConfig.rotation, llmquant.formats.rotation; "
           "every block linear here, the output layer never)." if result.get("rotation") else "")
        + (" '+compact': scales and zero points stored compact (QuantConfig.compact_qparams: 8-bit log-grid scales, "
           "zero points in the codes' width; llmquant.formats.packing)." if result.get("compact_qparams") else ""))
    meas = rows[0].get("measurement")  # made up front (--probe-sequences/--probe-positions)
    q = next((r for r in rows if "calibration" in r), None)
    if q:
        c = q["calibration"]
        lines.append(f"Calibration (disjoint from the evaluation text): {c['source']}, {c['nsamples']} × {c['seqlen']} "
                     f"tokens, seed {c['seed']}. Mixed: one measurement ("
                     + ("made before the mixed rows, which reuse it" if meas else
                        "its time is in the first mixed row, the later rows reuse it")
                     + "), then allocation and GPTQ with the chosen schemes.")
    if meas:
        c = meas["calibration"]
        lines.append(f"Measurement made in this run (its time is in no row): KL probes on {c['probe_positions']} positions "
                     f"of {c['probe_sequences']} held-out calibration sequence(s), Hessians on {c['hessian_sequences']} "
                     f"sequences; {meas['seconds']['total']:.0f} s, of which probes {meas['seconds']['probes']:.0f} s.")
    if result.get("note"):
        lines.append(f"Note: {result['note']}")
    finish_report(out, stem, lines, lambda path: _plot(result, path), quiet)


def _plot(result: dict, path: Path) -> None:
    from llmquant.evals.sweep import pyplot, save_figure

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    rows = result["rows"]
    tag = f" +{result['rotation']}" if result.get("rotation") else ""
    for method, marker in (("rtn", "o"), ("gptq", "s"), ("mixed", "^"), ("gptq-plain", "x")):
        pts = sorted((r["bpw"], r["ppl"]) for r in rows if r.get("method") == method)
        if pts:
            ax.plot(*zip(*pts), marker=marker, label={"rtn": f"RTN g128{tag}", "gptq": f"GPTQ g128{tag}",
                                                      "mixed": f"mixed (GPTQ){tag}", "gptq-plain": "GPTQ g128"}[method])
    ax.axhline(rows[0]["ppl"], color="gray", linestyle="--", label="float")
    ax.set_xlabel("bits per weight (quantized layers, metadata included)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_yscale("log")
    ax.set_title(result["model"])
    ax.legend()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    from llmquant.evals.sweep import sweep_main

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--uniform-bits", type=int, nargs="*", default=[2, 3, 4, 8])
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq"], choices=["rtn", "gptq"])
    p.add_argument("--budgets", type=float, nargs="*", default=DEFAULT_BUDGETS)
    p.add_argument("--measurement", type=Path, help="reuse this measurement file (default: measure in this run)")
    p.add_argument("--rotation", choices=["hadamard"], help="rotate every run's layers (QuantConfig.rotation)")
    p.add_argument("--plain-gptq-bits", type=int, nargs="*", default=[],
                   help="with --rotation: unrotated GPTQ baselines at these widths, in the same run")
    p.add_argument("--probe-sequences", type=int,
                   help="measure in this run with this many held-out sequences for the KL probes (default of "
                        "llmquant.mixed.measure.measure: 1)")
    p.add_argument("--probe-positions", type=int, help="... and this many of their positions (default 128)")
    p.add_argument("--float-targets", action="store_true",
                   help="GPTQ and mixed rows with QuantConfig.float_targets (each layer aims at the float model's outputs)")
    p.add_argument("--compact-qparams", action="store_true",
                   help="every quantized row stores compact scales and zero points (QuantConfig.compact_qparams)")
    p.add_argument("--tag", help="appended to the result files' names")
    return sweep_main(p, argv, run, write, DEFAULT_OUT)


if __name__ == "__main__":
    raise SystemExit(main())
