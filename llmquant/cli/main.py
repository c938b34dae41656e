"""The ``llmquant`` command line.

    llmquant demo [--model gemma3-270m]                  quantize to INT4 and compare perplexity
    llmquant quantize MODEL OUT --bits 4 --group-size 128 [--method gptq] ...
    llmquant eval ppl MODEL [--context 512 --stride 512 --max-tokens N --json FILE]
    llmquant eval compare BASE QUANT [--json FILE]
    llmquant info CKPT [--json FILE]
    llmquant recover CKPT OUT --teacher MODEL [--steps N --max-minutes M]
    llmquant distill TEACHER STUDENT OUT [--steps N]
    llmquant prune MODEL OUT --structured --keep 0.75 | --method sparsegpt --sparsity 0.5 [--pattern 2:4]
    llmquant prune-gradual MODEL OUT --keep 0.5 --rounds 3 [--steps N]   # or --method magnitude --sparsity 0.5
    llmquant recipe RECIPE.json OUT
    llmquant export-gptq CKPT OUT
    llmquant export-compressed-tensors CKPT OUT
    llmquant serve MODEL_OR_CKPT [--host 127.0.0.1 --port 8000]
"""
from __future__ import annotations

import argparse
import logging
import sys

from llmquant.cli import commands, prune, train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmquant", description="Make LLMs small and fast.")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)
    commands.add_quantize(sub)
    commands.add_eval(sub)
    commands.add_info(sub)
    commands.add_timing(sub)
    train.add_recover(sub)
    train.add_distill(sub)
    prune.add_prune(sub)
    prune.add_gradual(sub)
    prune.add_recipe(sub)
    commands.add_export_gptq(sub)
    commands.add_export_compressed_tensors(sub)
    commands.add_demo(sub)
    commands.add_serve(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError, FloatingPointError) as e:
        # user errors: one clear line, no traceback (use -v to see the log)
        print(f"llmquant {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # training saves its state first and says how to resume
        print(f"\nllmquant {args.command}: {e or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
