"""Tiny random causal LMs (hidden 64, 2 layers, vocab 256) of several families, built from a
transformers config with seeded weights: fast stand-ins for the real models in the GPTQ tests."""
from __future__ import annotations

import torch
import transformers

VOCAB = 256


def _config(family: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=16)
    if family == "gemma3":
        return transformers.Gemma3TextConfig(**common, head_dim=16, sliding_window=16,
                                             layer_types=["sliding_attention", "full_attention"])
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    if family == "opt":
        return transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64)
    raise ValueError(family)


#: family -> (model class, linear layer names of block 0 that GPTQ must replace)
FAMILIES = {
    "llama": transformers.LlamaForCausalLM,
    "qwen2": transformers.Qwen2ForCausalLM,
    "mistral": transformers.MistralForCausalLM,
    "gemma3": transformers.Gemma3ForCausalLM,
    "gpt2": transformers.GPT2LMHeadModel,
    "opt": transformers.OPTForCausalLM,
}


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = _config(family)
    cfg._attn_implementation = "sdpa"  # what real models load with; eager would return attention weights
    model = FAMILIES[family](cfg)
    model.eval()
    return model


def tiny_calibration(n: int = 16, seqlen: int = 64, seed: int = 1) -> list[torch.Tensor]:
    """Token sequences with some structure (a random walk over the vocabulary), [1, seqlen] each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        steps = torch.randint(-3, 4, (seqlen,), generator=g)
        start = torch.randint(0, VOCAB, (1,), generator=g)
        out.append(((start + steps.cumsum(0)) % VOCAB).unsqueeze(0))
    return out
