"""``llmquant recover`` and ``llmquant distill``: training against a teacher (llmquant.distill)."""
from __future__ import annotations

import argparse


def _add_training_args(p: argparse.ArgumentParser, steps: int, lr: float, alpha: float) -> None:
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    t.add_argument("--max-minutes", type=float,
                   help="stop after this much wall time, write what was reached; when --steps would not fit, "
                   "the learning-rate schedule is shortened (after timing 3 steps) to end inside it")
    t.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
    t.add_argument("--batch-size", type=int, default=1, help="windows per micro-batch")
    t.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    t.add_argument("--optimizer", choices=("adamw8bit", "adamw"), default="adamw8bit",
                   help="adamw8bit: bitsandbytes' 8-bit AdamW (default); adamw: torch's")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpoint-every", type=int, default=25, help="save the resumable state every N steps")
    t.add_argument("--state-dir", help="resumable state and teacher targets (default OUT.state)")
    t.add_argument("--teacher-cache", help="keep the teacher's top-k targets in this file, beyond the run, and "
                   "reuse them when teacher, text, k and T match (several runs against one teacher)")
    d = p.add_argument_group("data and loss")
    d.add_argument("--data", default="builtin",
                   help="training text: a calibration source ('builtin' news, 'pydoc', 'wiki', a file; join with +)")
    d.add_argument("--seqlen", type=int, default=256)
    d.add_argument("--max-windows", type=int, help="use at most this many windows of the text, drawn at random "
                   "(seed 0) from all of it: a large source such as 'wiki' without a teacher pass over all of it")
    d.add_argument("--heldout", type=int, default=4, help="windows kept out of training and evaluated")
    d.add_argument("--top-k", type=int, default=64, help="teacher logits kept per token")
    d.add_argument("--temperature", type=float, default=1.0)
    d.add_argument("--alpha", type=float, default=alpha,
                   help=f"weight of the KL term; 1 - alpha: cross-entropy on the text (default {alpha})")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", help="write the summary (with the per-step log) here too")


def _configs(args):
    from llmquant.distill import DataConfig, TrainConfig

    train = TrainConfig(steps=args.steps, max_minutes=args.max_minutes, batch_size=args.batch_size,
                        grad_accum=args.grad_accum, optimizer=args.optimizer, seed=args.seed,
                        checkpoint_every=args.checkpoint_every)
    data = DataConfig(source=args.data, seqlen=args.seqlen, heldout=args.heldout, top_k=args.top_k,
                      temperature=args.temperature, alpha=args.alpha, max_windows=args.max_windows)
    return train, data


def _report(summary: dict, out: str, path: str | None) -> None:
    from llmquant.distill.trainer import describe_steps

    first, last = summary.get("heldout_first") or {}, summary.get("heldout_last") or {}
    held = (f"held-out loss {first.get('loss', float('nan')):.4f} -> {last.get('loss', float('nan')):.4f}; "
            if first and last else "")
    mem = summary.get("optimizer_state_bytes")
    print(f"\n{summary['job']}: {describe_steps(summary)}, "
          f"{summary['tokens']} tokens, {summary['tokens_per_s']} tokens/s; {held}"
          f"optimizer {summary['optimizer']} state {mem / 2**20 if mem else 0:.2f} MiB; "
          f"{summary['wall_seconds']:.0f} s in all; saved to {out}")
    kept = summary.get("sparsity_kept")
    if kept:
        print(f"kept the pruned zeros: {100 * kept['sparsity']:.1f}% of {kept['layers']} layers' weights")
    if path:
        from llmquant.distill.trainer import write_log

        write_log(path, summary)


def add_recover_options(p: argparse.ArgumentParser) -> None:
    """What ``recover`` trains besides the scales (``llmquant recover`` and ``python -m evals.recovery``)."""
    p.add_argument("--train-codes", action="store_true",
                   help="in the block-wise phase, let every code move one step up or down (signed gradient on a "
                        "bounded offset); needs --blockwise-steps")
    p.add_argument("--lr-codes", type=float, default=2e-2,
                   help="the code offsets' signed-gradient step, in quantization steps (default 2e-2; a code "
                        "moves once its offset passes 0.5)")
    p.add_argument("--end-to-end-codes", action="store_true",
                   help="in the end-to-end phase, let every code move one step up or down from the one the phase "
                        "starts with (signed gradient on a bounded offset, on the training loss)")
    p.add_argument("--lr-codes-end-to-end", type=float, default=5e-3,
                   help="the end-to-end offsets' signed-gradient step at the top of the schedule (default 5e-3; "
                        "an offset moves at most about this times steps / 2)")
    p.add_argument("--momentum-codes-end-to-end", type=float, default=0.0,
                   help="move the end-to-end offsets by the sign of their gradient's running mean (momentum, e.g. "
                        "0.95) instead of each step's own gradient (default 0)")
    p.add_argument("--train-norms", action="store_true", help="also train the float norm weights")
    p.add_argument("--lr-norms", type=float, default=1e-4)
    p.add_argument("--blockwise-steps", type=int, default=0,
                   help="first train each decoder block against the teacher's block outputs, N Adam steps per block")
    p.add_argument("--blockwise-windows", type=int, default=64, help="training windows the block-wise phase uses")
    p.add_argument("--blockwise-lr-mult", type=float, default=5.0,
                   help="the block-wise phase's learning rates are the end-to-end ones times this (default 5)")


def recover_config(args: argparse.Namespace, train, data):
    """The RecoverConfig of parsed :func:`add_recover_options` (and ``--lr``) with these train/data configs."""
    import dataclasses

    from llmquant.distill import RecoverConfig

    own = {f.name for f in dataclasses.fields(RecoverConfig)} - {"train", "data"}
    return RecoverConfig(train=train, data=data, **{name: getattr(args, name) for name in own})


def add_recover(sub) -> None:
    p = sub.add_parser("recover", help="train a quantized checkpoint's scales against its float teacher")
    p.add_argument("checkpoint", help="an llmquant checkpoint (RTN, GPTQ or mixed)")
    p.add_argument("out", help="output checkpoint folder (same format)")
    p.add_argument("--teacher", required=True, help="the float model: built-in name or folder")
    add_recover_options(p)
    _add_training_args(p, steps=100, lr=1e-3, alpha=0.5)
    p.set_defaults(func=run_recover)


def run_recover(args: argparse.Namespace) -> int:
    from llmquant.distill import recover

    train, data = _configs(args)
    summary = recover(args.checkpoint, args.out, args.teacher, recover_config(args, train, data),
                      state_dir=args.state_dir, overwrite=args.overwrite, teacher_cache=args.teacher_cache)
    _report(summary, args.out, args.json)
    return 0


def add_distill(sub) -> None:
    p = sub.add_parser("distill", help="train a float student against a teacher with the same tokenizer")
    p.add_argument("teacher", help="built-in name or folder")
    p.add_argument("student", help="float student: built-in name or folder")
    p.add_argument("out", help="output folder (a plain Hugging Face checkpoint)")
    p.add_argument("--train-embeddings", action="store_true", help="also train the embedding and output layer")
    p.add_argument("--no-keep-sparsity", dest="keep_sparsity", action="store_false",
                   help="a pruned student's zeros train like any weight (default: they stay zero)")
    _add_training_args(p, steps=200, lr=1e-4, alpha=1.0)
    p.set_defaults(func=run_distill)


def run_distill(args: argparse.Namespace) -> int:
    from llmquant.distill import DistillConfig, distill

    train, data = _configs(args)
    config = DistillConfig(train=train, data=data, lr=args.lr, train_embeddings=args.train_embeddings,
                           keep_sparsity=args.keep_sparsity)
    summary = distill(args.teacher, args.student, args.out, config, state_dir=args.state_dir, overwrite=args.overwrite,
                      teacher_cache=args.teacher_cache)
    _report(summary, args.out, args.json)
    return 0
