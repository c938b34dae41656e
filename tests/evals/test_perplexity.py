import math

import pytest
import torch

from llmquant.evals.compare import compare
from llmquant.evals.perplexity import WIKITEXT2_SHA256, find_corpus, perplexity, windows

from ..conftest import build_tiny_llama


@pytest.mark.parametrize("bos", [None, 99])
@pytest.mark.parametrize("n,ctx,stride", [(10, 4, 4), (10, 4, 2), (9, 3, 1), (3, 8, 8), (8, 4, 4)])
def test_windows_score_every_token_once(n, ctx, stride, bos):
    tokens = torch.arange(n)
    scored = []
    for w in windows(tokens, ctx, stride, bos):
        ids = w.ids.tolist()
        assert len(ids) <= ctx + (bos is not None)
        if bos is not None:
            assert ids[0] == bos
        scored += ids[w.first_scored + 1 :]
    assert len(scored) == len(set(scored))  # no token is scored twice
    if bos is not None or stride < ctx:
        # with BOS every corpus token is scored; with overlapping windows all but the very first
        assert scored == list(range(0 if bos is not None else 1, n))


def test_windows_nonoverlapping_without_bos_skips_first_of_each():
    scored = []
    for w in windows(torch.arange(8), 4, 4, None):
        scored += w.ids[w.first_scored + 1 :].tolist()
    assert scored == [1, 2, 3, 5, 6, 7]


def test_windows_validate():
    with pytest.raises(ValueError, match="stride"):
        list(windows(torch.arange(8), 4, 5, None))


def test_corpus_found_and_hashed():
    path = find_corpus()
    import hashlib

    assert hashlib.sha256(path.read_bytes()).hexdigest() == WIKITEXT2_SHA256


def test_perplexity_records_protocol_and_matches_manual(tokenizer):
    model = build_tiny_llama()
    r = perplexity(model, tokenizer, context=64, bos=True, max_tokens=256, progress=False, label="tiny")
    p = r["protocol"]
    assert p["context"] == 64 and p["stride"] == 64 and p["bos"] and p["corpus_sha256"] == WIKITEXT2_SHA256
    assert r["tokens_scored"] == 256 and r["corpus_tokens"] == 256
    # manual: same windows, plain cross-entropy
    from llmquant.evals.perplexity import load_corpus, tokenize_corpus

    toks = tokenize_corpus(tokenizer, load_corpus()[0])[:256]
    nll = 0.0
    with torch.no_grad():
        for i in range(0, 256, 64):
            ids = torch.cat([torch.tensor([tokenizer.bos_token_id]), toks[i : i + 64]])[None]
            logits = model(ids).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
    assert math.isclose(r["ppl"], math.exp(nll / 256), rel_tol=1e-5)


def test_compare_identical_models_is_zero(tokenizer):
    a = build_tiny_llama(seed=0)
    r = compare(a, a, tokenizer, context=32, max_tokens=96, progress=False)
    assert abs(r["kl_mean"]) < 1e-6 and r["top1_agreement"] == 1.0
    b = build_tiny_llama(seed=1)
    r = compare(a, b, tokenizer, context=32, max_tokens=96, progress=False)
    assert r["kl_mean"] > 0.01 and r["tokens_scored"] == 96
