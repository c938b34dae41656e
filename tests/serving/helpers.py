"""Tiny random models built from configs, and the real server in a thread, for the serving tests."""
import copy
import time
from contextlib import contextmanager

import torch


def make_tiny_llama(
    vocab_size: int, seed: int = 0, max_position_embeddings: int = 256, eos_token_id: int | None = None
):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
        # larger than the usual 0.02: well-separated logits, so greedy never hangs on a float near-tie
        initializer_range=0.2, eos_token_id=eos_token_id, bos_token_id=None, pad_token_id=None,
    )
    return LlamaForCausalLM(cfg).eval()


def make_tiny_gemma3(vocab_size: int, seed: int = 0, sliding_window: int = 6):
    """Gemma-3 text model with a tiny sliding window, so prompts + outputs cross it."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
        sliding_window=sliding_window, layer_types=["sliding_attention", "sliding_attention",
                                                    "full_attention", "sliding_attention"],
        initializer_range=0.2, eos_token_id=None, bos_token_id=None, pad_token_id=0,
    )
    return Gemma3ForCausalLM(cfg).eval()


@contextmanager
def serving(model, tokenizer, *, name="tiny", api_key=None, max_batch=4, max_queue=8):
    """The real server (uvicorn in a thread, 127.0.0.1, a free port) over an Engine; yields (url, engine)."""
    from llmquant.serving.engine import Engine
    from llmquant.serving.launch import ServerThread
    from llmquant.serving.server import create_app

    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue).start()
    # the server encodes on its own thread: give it its own tokenizer copy (tests encode too)
    app = create_app(engine, copy.deepcopy(tokenizer), name, api_key=api_key)
    try:
        with ServerThread(app) as srv:
            yield srv.url, engine
    finally:
        engine.shutdown()


def wait_for(cond, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)
