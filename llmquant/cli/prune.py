"""``llmquant prune``: structured pruning into a smaller dense model, or unstructured/N:M sparsity."""
from __future__ import annotations

import argparse
import json


def _write_json(path: str | None, summary: dict) -> None:
    if path:
        from llmquant.fsutil import atomic_write_text

        atomic_write_text(path, json.dumps(summary, indent=1, default=str))


def add_prune(sub) -> None:
    p = sub.add_parser(
        "prune", help="prune a model: --structured (a smaller dense model) or --method magnitude|wanda|sparsegpt",
        description="Structured: remove MLP channels, attention heads and layers ranked by calibration importance "
                    "and write a smaller plain Hugging Face model (distill it afterwards: llmquant distill). "
                    "Unstructured/N:M: zero weights of the decoder blocks' linear layers; SparseGPT can "
                    "quantize with GPTQ in the same pass.")
    p.add_argument("model", help="built-in name or folder (a float model)")
    p.add_argument("out", help="output folder")
    p.add_argument("--structured", action="store_true", help="structured pruning (method 'structured')")
    p.add_argument("--method", choices=("magnitude", "wanda", "sparsegpt"), default=None,
                   help="unstructured/N:M method (default sparsegpt)")
    s = p.add_argument_group("structured")
    s.add_argument("--keep", type=float, default=None,
                   help="fraction of the decoder blocks' parameters kept (default 0.75 when no size is given)")
    s.add_argument("--axes", default="mlp,heads", help="what may shrink: mlp, heads, kv_heads, layers (comma list)")
    s.add_argument("--intermediate-size", type=int, help="explicit MLP width")
    s.add_argument("--heads-per-group", type=int, help="explicit query heads per KV head")
    s.add_argument("--kv-heads", type=int, help="explicit KV heads")
    s.add_argument("--num-layers", type=int, help="explicit number of layers")
    s.add_argument("--round-to", type=int, default=64, help="MLP widths are multiples of this (default 64)")
    u = p.add_argument_group("unstructured / N:M")
    u.add_argument("--sparsity", type=float, default=0.5, help="fraction of weights zeroed per layer (default 0.5)")
    u.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M such as 2:4")
    u.add_argument("--skip", action="append", default=[], help="layers left dense (pattern; repeatable)")
    u.add_argument("--quantize-bits", type=int, choices=(2, 3, 4, 8),
                   help="SparseGPT: also quantize (GPTQ grid) in the same pass to this many bits")
    u.add_argument("--group-size", type=int, default=128, help="with --quantize-bits (default 128)")
    u.add_argument("--asym", action="store_true", help="with --quantize-bits: asymmetric")
    c = p.add_argument_group("calibration")
    c.add_argument("--calibration", default="builtin", help="calibration source (default: the built-in news text)")
    c.add_argument("--nsamples", type=int, default=32)
    c.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", help="write the summary here too")
    p.set_defaults(func=run_prune)


def config_from_args(args: argparse.Namespace):
    from llmquant.config import QuantConfig
    from llmquant.prune import SparsityConfig, StructuredConfig

    common = dict(calibration=args.calibration, nsamples=args.nsamples, seqlen=args.seqlen)
    if args.structured:
        if args.method is not None:
            raise ValueError("--structured and --method exclude each other")
        sizes = dict(intermediate_size=args.intermediate_size, heads_per_group=args.heads_per_group,
                     kv_heads=args.kv_heads, num_layers=args.num_layers)
        keep = args.keep if args.keep is not None else (None if any(v is not None for v in sizes.values()) else 0.75)
        return StructuredConfig(keep=keep, axes=args.axes, round_to=args.round_to, **sizes, **common)
    if args.keep is not None:
        raise ValueError("--keep is for --structured; unstructured pruning takes --sparsity")
    quantize = None
    if args.quantize_bits is not None:
        quantize = QuantConfig(method="gptq", bits=args.quantize_bits, group_size=args.group_size,
                               sym=not args.asym, act_order=False)
    return SparsityConfig(method=args.method or "sparsegpt", sparsity=args.sparsity, pattern=args.pattern,
                          skip=tuple(args.skip), quantize=quantize, **common)


def run_prune(args: argparse.Namespace) -> int:
    from llmquant.prune.jobs import prune

    config = config_from_args(args)
    summary = prune(args.model, args.out, config, overwrite=args.overwrite)
    if config.method == "structured":
        s = summary["shape"]
        print(f"\nstructured: {s['layers']} layers, {s['kv_heads']} KV x {s['heads_per_group']} query heads, "
              f"MLP {s['intermediate']}; {100 * summary['kept_fraction']:.1f}% of the decoder-block parameters "
              f"kept ({summary['params']['before'] / 1e6:.1f}M -> {summary['params']['after'] / 1e6:.1f}M in all); "
              f"{summary['wall_seconds']:.0f} s; saved to {args.out} (a plain Hugging Face model; recover its quality "
              f"with: llmquant distill {args.model} {args.out} OUT)")
    else:
        q = f", quantized to {config.quantize.bits} bits" if config.quantize else ""
        print(f"\n{config.method}: {len(summary['layers'])} layers at {100 * summary['sparsity']:.1f}% zeros "
              f"({config.pattern}{q}); {summary['wall_seconds']:.0f} s; saved to {args.out}")
    _write_json(args.json, summary)
    return 0


def add_gradual(sub) -> None:
    from llmquant.cli.train import _add_training_args

    p = sub.add_parser("prune-gradual", help="pruning in several prune -> distill rounds (cubic schedule): "
                                              "structured (--keep) or unstructured (--method ... --sparsity)")
    p.add_argument("model", help="built-in name or folder (a float model); also the teacher unless --teacher")
    p.add_argument("out", help="output folder (a plain Hugging Face model)")
    p.add_argument("--keep", type=float, help="structured: final fraction of the decoder-block parameters")
    p.add_argument("--method", choices=("magnitude", "wanda", "sparsegpt"),
                   help="unstructured pruning with this method, to --sparsity (instead of structured --keep)")
    p.add_argument("--sparsity", type=float, help="unstructured: final fraction of each layer's weights zeroed")
    p.add_argument("--skip", action="append", default=[], help="unstructured: layers left dense (pattern; repeatable)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--schedule", choices=("cubic", "linear"), default="cubic")
    p.add_argument("--axes", default="mlp,heads", help="structured: what may shrink: mlp, heads, kv_heads, layers")
    p.add_argument("--round-to", type=int, default=64)
    p.add_argument("--teacher", help="teacher (default: the model itself)")
    p.add_argument("--calibration", default="builtin")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=512)
    _add_training_args(p, steps=300, lr=2e-4, alpha=1.0)
    p.set_defaults(func=run_gradual)


def gradual_target(args: argparse.Namespace):
    """The final size of ``prune-gradual``: a StructuredConfig (--keep) or a SparsityConfig (--method)."""
    from llmquant.prune import SparsityConfig, StructuredConfig

    common = dict(calibration=args.calibration, nsamples=args.nsamples, seqlen=args.calib_seqlen)
    if args.method is None:
        if args.keep is None or args.sparsity is not None:
            raise ValueError("prune-gradual: give --keep (structured) or --method with --sparsity (unstructured)")
        return StructuredConfig(keep=args.keep, axes=args.axes, round_to=args.round_to, **common)
    if args.keep is not None or args.sparsity is None:
        raise ValueError("prune-gradual --method prunes to --sparsity (not --keep, which is structured)")
    return SparsityConfig(method=args.method, sparsity=args.sparsity, skip=tuple(args.skip), **common)


def run_gradual(args: argparse.Namespace) -> int:
    from llmquant.cli.train import _configs
    from llmquant.distill import DistillConfig
    from llmquant.prune.gradual import gradual

    train, data = _configs(args)
    final = gradual_target(args)
    summary = gradual(args.model, args.out, final, DistillConfig(train=train, data=data, lr=args.lr), args.rounds,
                      kind=args.schedule, teacher=args.teacher, state_dir=args.state_dir, overwrite=args.overwrite)
    for h in summary["history"]:
        held = (h.get("heldout_last") or {}).get("loss")
        size = (f"{100 * h['sparsity']:.1f}% zeros" if "sparsity" in h else
                f"{100 * h['kept_fraction']:.1f}% of the block parameters, shape {h['shape']}")
        print(f"round {h['round']}: {size}, {h['steps']} steps, held-out loss {held if held is None else round(held, 4)}")
    print(f"gradual: {summary['wall_seconds'] / 60:.1f} min; saved to {args.out}")
    _write_json(args.json, summary)
    return 0


def add_recipe(sub) -> None:
    p = sub.add_parser("recipe", help="run a JSON recipe of steps: prune -> distill -> quantize (resumable)")
    p.add_argument("recipe", help="a JSON file: {\"model\": ..., \"steps\": [{\"method\": ..., ...}, ...]}")
    p.add_argument("out", help="output folder (the last step's result)")
    p.add_argument("--model", help="input model (default: the recipe's \"model\")")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run_recipe_cli)


def run_recipe_cli(args: argparse.Namespace) -> int:
    from llmquant.recipe import RecipeError, load_recipe, run_recipe

    recipe = load_recipe(args.recipe)
    model = args.model or recipe.get("model")
    if not model:
        raise RecipeError("no input model: give --model or a \"model\" in the recipe")
    result = run_recipe(model, recipe["steps"], args.out, overwrite=args.overwrite)
    for s in result["steps"]:
        print(f"step {s['step']}: {s['method']} ({s['summary'].get('step_seconds', 'reused')} s)")
    print(f"recipe: {result['wall_seconds'] / 60:.1f} min; saved to {args.out}")
    return 0
