"""What ``llmquant recover`` buys back: perplexity of the float teacher, the quantized checkpoint and the
recovered one, with the training's wall time, and the loss curve. One command per result:

    python -m llmquant.evals.recovery --teacher gemma3-270m --checkpoint CKPT --label gemma3-270m-gptq-int3-g128 \\
        --steps 300 --max-minutes 60 [--train-norms] [--recovered OUT]

trains (``llmquant.distill.recover``; skipped when ``--recovered`` names an existing output, whose
``llmquant_training.json`` is then read), scores all three on the same WikiText-2 protocol, and writes
``evals/results/recover_<label>.{md,json,png}``. "Damage removed" is the share of the checkpoint's
perplexity increase over float that recovery took away.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def run(args: argparse.Namespace) -> dict:
    import torch

    from llmquant.cli.train import recover_config
    from llmquant.distill import DataConfig, TrainConfig, recover
    from llmquant.distill.recipes import LOG_FILE
    from llmquant.evals.compare import compare
    from llmquant.evals.machine import machine_info
    from llmquant.evals.perplexity import perplexity
    from llmquant.models import bos_for_raw_text, load_model

    out_ckpt = Path(args.recovered or f"{args.checkpoint.rstrip('/')}-recovered")
    if out_ckpt.exists() and (out_ckpt / LOG_FILE).exists():
        training = json.loads((out_ckpt / LOG_FILE).read_text())
    else:
        config = recover_config(
            args,
            TrainConfig(steps=args.steps, max_minutes=args.max_minutes, grad_accum=args.grad_accum,
                        optimizer=args.optimizer),
            DataConfig(source=args.data, seqlen=args.seqlen, top_k=args.top_k, max_windows=args.max_windows,
                       alpha=args.alpha, temperature=args.temperature))
        training = recover(args.checkpoint, str(out_ckpt), args.teacher, config, teacher_cache=args.teacher_cache)
    proto = dict(corpus=args.corpus, context=args.context, max_tokens=args.max_tokens)
    rows, teacher = [], None
    for label, path in (("float", args.teacher), ("quantized", args.checkpoint), ("recovered", str(out_ckpt))):
        model, tok = load_model(path)
        bos = bos_for_raw_text(args.teacher, tok)
        row = dict(perplexity(model, tok, bos=bos, label=label, **proto), run=label, path=str(path))
        # --kl: did training bring the model closer to the teacher on the evaluation text, or only fit the text?
        if args.kl and teacher is None:  # the float row's model is the teacher: kept for the rows after it
            teacher = model
            row.update(kl_to_teacher=0.0, top1_agreement=1.0)
        elif args.kl:
            c = compare(teacher, model, tok, bos=bos, label=label, **proto)
            row.update(kl_to_teacher=c["kl_mean"], top1_agreement=c["top1_agreement"])
        rows.append(row)
        del model
        torch.manual_seed(0)
    del teacher
    base, q, r = (x["ppl"] for x in rows)
    for x in rows:
        x["ppl_increase_pct"] = 100 * (x["ppl"] / base - 1)
    log = training.pop("log", [])
    # a resumed run's own "seconds" cover only its part: the steps' times add up to all of it
    training["train_seconds_all_steps"] = round(sum(e["seconds"] for e in log), 1)
    return {
        "label": args.label, "teacher": args.teacher, "checkpoint": args.checkpoint,
        "machine": machine_info(), "rows": rows,
        "damage_removed_pct": 100 * (q - r) / (q - base) if q > base else None,
        "training": training, "loss_curve": [(e["step"], e["loss"]) for e in log],
    }


def write(result: dict, out: Path, quiet: bool = False) -> None:
    from llmquant.distill.trainer import describe_steps
    from llmquant.evals.perplexity import format_table, write_json
    from llmquant.evals.sweep import finish_report, report_head

    out.mkdir(parents=True, exist_ok=True)
    stem = f"recover_{result['label']}"
    write_json(out / f"{stem}.json", result)
    t = result["training"]
    has_kl = "kl_to_teacher" in result["rows"][0]
    columns = [("run", "run"), ("ppl", "ppl"), ("Δ ppl %", "ppl_increase_pct")]
    if has_kl:
        columns += [("KL to teacher", "kl_to_teacher"), ("top-1 agreement", "top1_agreement")]
    table = format_table(result["rows"], columns)
    cfg = t.get("recover_config", {})
    data, train = cfg.get("data", {}), cfg.get("train", {})
    trained = (["scales"] + (["norms"] if cfg.get("train_norms") else [])
               + (["code offsets"] if cfg.get("end_to_end_codes") else []))
    bw = t.get("blockwise")
    if bw:
        trained_bw = (f"block-wise phase first: {bw['steps_per_block']} Adam steps per block on {bw['windows']} windows, "
                      f"learning rates ×{cfg.get('blockwise_lr_mult')}, {bw['seconds'] / 60:.1f} min, "
                      "relative block error summed "
                      f"{sum(b['rel_error_before'] for b in bw['blocks']):.3g} → "
                      f"{sum(b['rel_error_after'] for b in bw['blocks']):.3g}"
                      + (f", {bw['codes_changed']} of {bw['codes']} codes moved one step by signed gradient "
                         f"(step {cfg.get('lr_codes')})" if "codes_changed" in bw else "")
                      + "; then ")
    else:
        trained_bw = ""
    lines = report_head(f"Quantization-aware recovery: {result['label']}", result["machine"], table,
                        result["rows"][0]["protocol"])
    lines += [
        "",
        f"Damage removed: **{result['damage_removed_pct']:.1f}%** of the checkpoint's perplexity increase over float."
        if result["damage_removed_pct"] is not None else
        "Damage removed: none to remove (the quantized checkpoint's perplexity is not above float's).",
    ]
    if has_kl:
        kq, kr = (x["kl_to_teacher"] for x in result["rows"][1:])
        lower = f" ({100 * (kq - kr) / kq:.1f}% lower)" if kq > 0 else ""
        lines.append(f"KL(teacher ‖ model) over the whole vocabulary on the same evaluation tokens: quantized {kq:.4f} → "
                     f"recovered {kr:.4f}{lower}: how much closer to the teacher, apart from fitting the training text.")
    lines += [
        f"Training: {trained_bw}end to end {describe_steps(t)}, {t['tokens']} tokens"
        + (f" ({t['passes']:.2f} passes over the training windows)" if "passes" in t else "") + ", "
        f"{t['tokens_per_s']} tokens/s, {t['train_seconds_all_steps'] / 60:.1f} min of training steps"
        + (f" (resumed at step {t['resumed_at']}: the run was stopped and resumed from its saved state)"
           if t.get("resumed_at") else "")
        + f"; this process {t['wall_seconds'] / 60:.1f} min in all (loading, teacher top-k unless cached, "
        f"evaluations and saving included); trained {', '.join(trained)} "
        f"({t['trained_parameters']} values), lr {cfg.get('lr')}"
        + (f" (norms {cfg.get('lr_norms')})" if cfg.get("train_norms") else "")
        + (f"; codes moved by signed gradient (step {cfg.get('lr_codes_end_to_end')}"
           + (f", sign of the gradient's running mean, momentum {cfg['momentum_codes_end_to_end']}"
              if cfg.get("momentum_codes_end_to_end") else "")
           + f", one quantization step at most): {t['codes_changed_end_to_end']} of {t['codes']} moved"
           if "codes_changed_end_to_end" in t else "")
        + f", optimizer {t['optimizer']} "
        f"({(t['optimizer_state_bytes'] or 0) / 2**20:.2f} MiB of state), batch {train.get('batch_size')} × "
        f"{train.get('grad_accum')} windows of {data.get('seqlen')} tokens.",
        f"Teacher: {result['teacher']}; loss: {data.get('alpha')} × T² × KL on the teacher's top-{data.get('top_k')} "
        f"at T = {data.get('temperature')}"
        + (f" + {1 - data['alpha']:g} × cross-entropy on the text" if data.get("alpha", 1.0) < 1 else "")
        + f"; training text: {data.get('source')!r}"
        + (f" ({data['max_windows']} windows drawn at random, seed 0)" if data.get("max_windows") else "")
        + " (llmquant.calibration; disjoint "
        "from WikiText-2), the last held-out windows scored for the log.",
        f"Held-out loss: {(t.get('heldout_first') or {}).get('loss', float('nan')):.4f} → "
        f"{(t.get('heldout_last') or {}).get('loss', float('nan')):.4f}.",
    ]
    if bw:
        lines.append(f"Training time in all (block-wise and end-to-end steps): "
                     f"{(bw['seconds'] + t['train_seconds_all_steps']) / 60:.1f} min.")
    if t.get("note"):
        lines.append(f"Note: {t['note']}.")
    finish_report(out, stem, lines, lambda path: _plot(result, path), quiet)


def _plot(result: dict, path: Path) -> None:
    from llmquant.evals.sweep import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    if result["loss_curve"]:
        steps, loss = zip(*result["loss_curve"])
        ax.plot(steps, loss, label="train loss (per step)", lw=1)
    ev = result["training"].get("evals") or []
    if ev:
        ax.plot([e["step"] for e in ev], [e["loss"] for e in ev], "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("T² · KL(teacher ‖ student), nats/token")
    ax.set_yscale("log")
    ax.set_title(f"recover: {result['label']}")
    ax.legend()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    from llmquant.cli.train import add_recover_options

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--label", required=True)
    p.add_argument("--recovered", help="the recovered output folder (reused if it exists)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--max-minutes", type=float)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--optimizer", default="adamw8bit")
    add_recover_options(p)
    p.add_argument("--teacher-cache", help="a file for the teacher's top-k targets that outlives the run")
    p.add_argument("--data", default="builtin")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--max-windows", type=int)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--alpha", type=float, default=1.0, help="weight of the KL term (1 - alpha: cross-entropy on the text)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--corpus")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--kl", action="store_true",
                   help="also the full-vocabulary KL(teacher || model) and top-1 agreement on the evaluation text")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = run(args)
    result["command"] = "python -m llmquant.evals.recovery " + " ".join(sys.argv[1:] if argv is None else argv)
    write(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
