"""``llmquant serve``: the argument parser, and the real command in a subprocess on a saved tiny model."""
import argparse
import importlib.util
import os
import signal
import socket
import subprocess
import sys

import httpx
import openai
import pytest

from llmquant.serving.cli import add_serve_parser, run_serve

from .helpers import make_tiny_llama, wait_for


def parse(argv):
    parser = argparse.ArgumentParser(prog="llmquant")
    add_serve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_parser_defaults_and_options():
    a = parse(["serve", "smollm2-135m"])
    assert (a.command, a.model, a.host, a.port, a.backend, a.api_key) == ("serve", "smollm2-135m", "127.0.0.1",
                                                                          8000, "embedded", None)
    assert a.func is run_serve
    a = parse(["serve", "ckpt", "--port", "9001", "--backend", "vllm", "--max-batch", "8", "--max-queue", "3"])
    assert (a.port, a.backend, a.max_batch, a.max_queue) == (9001, "vllm", 8, 3)
    with pytest.raises(SystemExit):
        parse(["serve", "m", "--backend", "tgi"])


@pytest.mark.skipif(importlib.util.find_spec("llmquant.serving.vllm_backend") is not None,
                    reason="the vLLM backend is installed: --backend vllm would start it")
def test_vllm_backend_missing_is_a_clear_error():
    with pytest.raises(SystemExit, match="--backend vllm needs llmquant.serving.vllm_backend"):
        run_serve(parse(["serve", "m", "--backend", "vllm"]))


def test_serve_command_end_to_end(tmp_path, tokenizer):
    model = make_tiny_llama(len(tokenizer), seed=5, eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    with socket.socket() as s:  # a free port (the child binds it a moment later)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "LLMQUANT_API_KEY": "k3y", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "llmquant.serving.cli", str(tmp_path / "tiny"), "--port", str(port),
           "--served-model-name", "tiny", "--device", "cpu", "--max-batch", "2", "--threads", "1",
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    def up():
        if proc.poll() is not None:
            raise AssertionError(f"llmquant serve exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(up, timeout=120, what="the server to come up")
        client = openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0)
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert r.usage.completion_tokens <= 4 and r.choices[0].finish_reason in ("length", "stop")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal: -SIGTERM is a clean exit
    out = proc.stdout.read()
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Traceback" not in out, out
