"""``llmquant serve MODEL_OR_CKPT``: the OpenAI-compatible server from the command line.

The project CLI (``llmquant/cli/main.py``) calls :func:`add_serve_parser` and :func:`run_serve`;
``python -m llmquant.serving.cli MODEL ...`` runs the same thing stand-alone.

MODEL_OR_CKPT is resolved by ``llmquant.models.load_model``: a built-in name (``gemma3-270m``,
``smollm2-135m``), an llmquant checkpoint or a transformers model folder.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

API_KEY_ENV = "LLMQUANT_API_KEY"


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="built-in model name (gemma3-270m, smollm2-135m), llmquant checkpoint "
                   "or transformers model folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV}, if set)")
    p.add_argument("--backend", choices=("embedded", "vllm"), default="embedded",
                   help="embedded: llmquant's own continuous-batching engine; vllm: hand the model to vLLM")
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: MODEL_OR_CKPT)")
    p.add_argument("--max-batch", type=int, default=16, help="rows of the running batch (concurrent generations)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                   help="activation / float-weight dtype (default: float16 on CUDA, float32 on CPU)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op CPU threads (default: torch's choice; 1 is often best on a busy machine)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` sub-command to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser("serve", help="serve a model with an OpenAI-compatible HTTP API",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=run_serve)
    return p


def _dtype(spec: str, device: str) -> Any:
    import torch

    if spec == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[spec]


def _device(spec: str) -> str:
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec


def run_serve(args: argparse.Namespace) -> int:
    """Run the server until interrupted; returns the process exit code."""
    if args.backend == "vllm":
        if importlib.util.find_spec("llmquant.serving.vllm_backend") is None:
            raise SystemExit("llmquant serve: --backend vllm needs llmquant.serving.vllm_backend, which this "
                             "installation does not have; use --backend embedded")
        return importlib.import_module("llmquant.serving.vllm_backend").run(args)

    try:
        import uvicorn

        from llmquant.serving.server import create_app
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"llmquant serve needs the serving extra: pip install 'llmquant[serve]' ({e})"
        ) from None
    from llmquant.serving.engine import Engine

    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("llmquant").setLevel(args.log_level.upper())
    import torch

    from llmquant.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    model, tokenizer = load_model(args.model, dtype=_dtype(args.dtype, device))
    model = model.to(device).eval()
    from llmquant.modules.quant_linear import prepare_model

    kernels = prepare_model(model)  # kernels chosen and weights repacked before the first request
    if kernels:
        logger.info("quantized layers: %s", ", ".join(f"{n} on {d}" for d, n in kernels.items()))
    name = args.served_model_name or args.model
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_queue=args.max_queue,
                    max_model_len=args.max_model_len).start()
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    app = create_app(engine, tokenizer, name, api_key=api_key)
    logger.info("serving %s as %r on http://%s:%d (max_batch=%d, max_queue=%d, context=%d, auth=%s)",
                args.model, name, args.host, args.port, args.max_batch, args.max_queue, engine.max_model_len,
                "on" if api_key else "off")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmquant.serving.cli", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    return run_serve(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
