"""KL divergence and top-1 agreement of a quantized model against its float base, on the same tokens.

Same windows as :mod:`llmquant.evals.perplexity` (the protocol is recorded the same way). For each
scored position: KL(P_base ‖ P_quant) = Σ_v p_base(v) (log p_base(v) − log p_quant(v)), and whether
both models' most likely next token agree. Reported as means over all scored positions, with both
models' perplexities on those tokens.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from llmquant.evals.perplexity import prepare, window_nll


def compare(
    base,
    quant,
    tokenizer,
    *,
    corpus=None,
    context: int = 512,
    stride: int | None = None,
    bos: bool = True,
    max_tokens: int | None = 16384,
    progress: bool = True,
    label: str = "",
) -> dict:
    if base.config.vocab_size != quant.config.vocab_size:
        raise ValueError(f"vocabularies differ: {base.config.vocab_size} vs {quant.config.vocab_size}")
    proto, _, wins = prepare(tokenizer, corpus, context, stride, bos, max_tokens)
    kl_sum, agree, count, nll_b, nll_q = 0.0, 0, 0, 0.0, 0.0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for w in tqdm(wins, desc=f"compare {label}".strip(), unit="win", disable=not progress):
            sb, c, lpb = window_nll(base, w)
            sq, _, lpq = window_nll(quant, w)
            kl = (lpb.exp() * (lpb - lpq)).sum(-1)
            kl_sum += float(kl.double().sum())
            agree += int((lpb.argmax(-1) == lpq.argmax(-1)).sum())
            nll_b += sb
            nll_q += sq
            count += c
    if count == 0:
        raise ValueError("no tokens scored: the corpus slice is shorter than two tokens")
    return {
        "model": label,
        "protocol": asdict(proto),
        "tokens_scored": count,
        "kl_mean": kl_sum / count,
        "top1_agreement": agree / count,
        "ppl_base": math.exp(nll_b / count),
        "ppl_quant": math.exp(nll_q / count),
        "wall_s": time.perf_counter() - t0,
    }
