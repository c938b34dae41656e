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


# --- a machine without the corpus --------------------------------------------------------------------
@pytest.fixture()
def no_local_corpus(monkeypatch, tmp_path):
    """As on a fresh clone: no shared/ beside the checkout, no $LLMQUANT_WIKITEXT2, an empty cache."""
    from llmquant.evals import perplexity as ppl

    monkeypatch.setattr(ppl, "_checkout_candidates", lambda: [])
    monkeypatch.delenv(ppl.CORPUS_ENV, raising=False)
    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    return ppl


def _assert_says_what_to_do(message: str) -> None:
    for fix in ("--corpus", "LLMQUANT_WIKITEXT2", "pip install 'llmquant[eval]'", "Salesforce/wikitext"):
        assert fix in message, (fix, message)


def test_no_corpus_no_datasets_says_what_to_do(no_local_corpus, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(FileNotFoundError) as e:
        no_local_corpus.load_corpus()
    _assert_says_what_to_do(str(e.value))
    assert "is not installed" in str(e.value)


def test_no_corpus_no_network_says_what_to_do(no_local_corpus, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as without a network, at once
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(no_local_corpus.cached_corpus_path().parent / "hf"))
    with pytest.raises(FileNotFoundError) as e:
        no_local_corpus.load_corpus()
    _assert_says_what_to_do(str(e.value))
    assert "downloading it failed" in str(e.value)


def test_demo_fails_fast_with_the_fix(no_local_corpus, monkeypatch, capsys):
    """``llmquant demo`` on a fresh clone without network: one clear line, before loading any model."""
    from llmquant.cli.main import main

    monkeypatch.setitem(__import__("sys").modules, "datasets", None)
    monkeypatch.setattr("llmquant.models.load_model", lambda *a, **k: pytest.fail("loaded a model first"))
    assert main(["demo", "--out", str(no_local_corpus.cached_corpus_path().parent / "demo")]) == 2
    _assert_says_what_to_do(capsys.readouterr().err)


@pytest.fixture()
def real_corpus():
    return find_corpus()


def test_a_downloaded_copy_is_found_in_the_cache(real_corpus, no_local_corpus):
    """What fetch_corpus leaves behind is what later runs read (checked by its sha256)."""
    from llmquant.fsutil import atomic_write_bytes

    atomic_write_bytes(no_local_corpus.cached_corpus_path(), real_corpus.read_bytes())
    text, sha, source = no_local_corpus.load_corpus()
    assert sha == WIKITEXT2_SHA256 and source == str(no_local_corpus.cached_corpus_path())
