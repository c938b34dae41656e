"""The command line that ``llmquant serve --backend vllm`` hands to vLLM.

Needs no vLLM (nothing is started), so it runs in the default suite; the server itself is tested in
``test_vllm_serving.py`` (marked ``vllm``).
"""
from __future__ import annotations

import argparse
import json
import sys

from llmquant.serving import vllm_backend


def serve_args(model, **kw) -> argparse.Namespace:
    base = dict(model=str(model), host="127.0.0.1", port=8123, api_key=None, backend="vllm", served_model_name=None,
                max_batch=16, max_queue=64, max_model_len=None, device="auto", dtype="auto", log_level="info")
    return argparse.Namespace(**(base | kw))


def write_config(folder, quantization_config=None):
    folder.mkdir()
    cfg = {"architectures": ["LlamaForCausalLM"]}
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_llmquant_checkpoint_gets_the_plugin_and_the_serving_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMQUANT_VLLM_PYTHON", "/some/venv/bin/python")
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    ckpt = write_config(tmp_path / "q", {"quant_method": "llmquant", "format_version": 1})
    argv, env = vllm_backend.build_command(
        serve_args(ckpt, port=9001, served_model_name="tiny", max_model_len=256, dtype="bfloat16", api_key="s3cret")
    )
    assert argv[:3] == ["/some/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert argv.count("--enforce-eager") == 1
    rest = [a for a in argv[3:] if a != "--enforce-eager"]  # every other flag takes one value
    flags = dict(zip(rest[::2], rest[1::2]))
    assert flags == {
        "--model": str(ckpt), "--host": "127.0.0.1", "--port": "9001", "--served-model-name": "tiny",
        "--quantization": "llmquant", "--max-model-len": "256", "--dtype": "bfloat16", "--max-num-seqs": "16",
    }
    assert env["VLLM_API_KEY"] == "s3cret" and "s3cret" not in argv  # not visible in the process list
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"


def test_float_checkpoint_gets_no_quantization_flag_and_env_key_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMQUANT_API_KEY", "from-env")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    ckpt = write_config(tmp_path / "f")
    argv, env = vllm_backend.build_command(serve_args(ckpt))
    assert "--quantization" not in argv and "--dtype" not in argv and "--max-model-len" not in argv
    assert argv[argv.index("--served-model-name") + 1] == str(ckpt)
    assert env["VLLM_API_KEY"] == "from-env"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4"  # the user's setting wins


def test_python_is_the_override_then_the_venv_then_this_interpreter(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMQUANT_VLLM_PYTHON", "/x/python")
    assert vllm_backend.vllm_python() == "/x/python"
    monkeypatch.delenv("LLMQUANT_VLLM_PYTHON")
    fake_venv = tmp_path / "bin" / "python"
    monkeypatch.setattr(vllm_backend, "VENV_PYTHON", fake_venv)
    assert vllm_backend.vllm_python() == sys.executable
    fake_venv.parent.mkdir()
    fake_venv.write_text("")
    assert vllm_backend.vllm_python() == str(fake_venv)
