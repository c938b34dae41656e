"""Calibration sequences: shapes, BOS handling, determinism, disjoint windows, sources and errors."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from llmquant import calibration
from llmquant.calibration import builtin_documents, calibration_batches, load_documents, token_stream

WIKITEXT = Path("/work/shared/data/wikitext-2-raw")


def word_tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    """A real (word-level) fast tokenizer over the built-in text's vocabulary; unknown words -> <unk>."""
    words = sorted({w for d in builtin_documents() for w in re.findall(r"\w+|[^\w\s]+", d)})
    vocab = {"<unk>": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


def find_starts(stream: list[int], samples: list[torch.Tensor], skip: int) -> list[int]:
    """Where each sample (after ``skip`` leading tokens) sits in the stream."""
    starts = []
    for s in samples:
        body = s[0, skip:].tolist()
        hits = [i for i in range(len(stream) - len(body) + 1) if stream[i] == body[0] and stream[i:i + len(body)] == body]
        assert hits, "sample is not a slice of the token stream"
        starts.append(hits[0])
    return starts


def test_builtin_source_shapes_bos_and_disjoint_windows(tok):
    batches = calibration_batches(tok, "builtin", nsamples=100, seqlen=512, seed=0)
    assert len(batches) == 100
    assert all(b.shape == (1, 512) and b.dtype == torch.int64 for b in batches)
    assert all(int(b[0, 0]) == tok.bos_token_id for b in batches)
    stream = token_stream(tok, builtin_documents())
    assert len(stream) > 100 * 511  # room for disjoint windows
    starts = sorted(find_starts(stream, batches[:20], skip=1))
    assert all(b - a >= 511 for a, b in zip(starts, starts[1:]))


def test_named_sources():
    news = load_documents("news")
    assert load_documents("builtin") == news
    assert len(news) == 300 and all(len(d) > 200 for d in news)  # one news article per line
    assert "bushfire" in news[0]
    pydoc = load_documents("pydoc")
    assert pydoc and not set(pydoc) & set(news)


def test_wiki_source_is_plain_running_text():
    wiki = load_documents("wiki")
    assert len(wiki) == 106 and 2_500_000 < sum(map(len, wiki)) < 3_100_000
    assert wiki[0].startswith("Anarchism is a political philosophy")
    text = "\n".join(wiki)
    # markup, citations, image captions, categories and reference sections are gone
    for mark in ("[[", "]]", "{{", "}}", "<ref", "thumb|", "Category:", "{|", "\'\'\'"):
        assert mark not in text, mark
    # the end matter is cut off (about 100 such headings in the raw articles; one survives in a malformed one)
    assert len(re.findall(r"^(References|External links|Further reading|See also)\s*$", text, re.M)) <= 2


def test_wiki_source_is_checked(monkeypatch):
    monkeypatch.setattr(calibration, "WIKI_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="Wikipedia excerpt .* has sha256 a53f4648.*expected 0000"):
        load_documents("wiki")


def test_news_corpus_is_checked(monkeypatch):
    monkeypatch.setattr(calibration, "NEWS_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="has sha256 5d78d6da.*expected 0000.*gensim==4.4.0"):
        load_documents("builtin")
    monkeypatch.setattr(calibration, "NEWS_PACKAGE", "llmquant_no_such_package")
    with pytest.raises(ValueError, match="comes with the 'llmquant_no_such_package' package, which is not installed"):
        load_documents("news")


def test_seed_determines_the_samples(tok):
    a = calibration_batches(tok, nsamples=8, seqlen=64, seed=0)
    b = calibration_batches(tok, nsamples=8, seqlen=64, seed=0)
    c = calibration_batches(tok, nsamples=8, seqlen=64, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_tokenizer_without_bos():
    tok = word_tokenizer(bos=False)
    batches = calibration_batches(tok, nsamples=4, seqlen=32, seed=3)
    stream = token_stream(tok, builtin_documents())
    assert all(b.shape == (1, 32) for b in batches)
    find_starts(stream, batches, skip=0)  # every token comes from the text: no BOS


def test_bos_override():
    plain = word_tokenizer(bos=False)
    forced = calibration_batches(plain, nsamples=3, seqlen=16, bos=True)
    assert all(int(b[0, 0]) == plain.bos_token_id for b in forced)
    with_bos = word_tokenizer(bos=True)
    dropped = calibration_batches(with_bos, nsamples=3, seqlen=16, bos=False)
    assert not any(int(b[0, 0]) == with_bos.bos_token_id for b in dropped)


@pytest.mark.skipif(not WIKITEXT.exists(), reason="WikiText-2 not present")
@pytest.mark.parametrize("source", ["news", "pydoc"])
def test_builtin_text_is_not_the_evaluation_set(source):
    text = "\n".join(load_documents(source))
    wiki_lines = [
        line.strip()
        for f in sorted(WIKITEXT.iterdir()) if f.is_file()
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines()[:400]
        if len(line.strip()) > 80
    ]
    assert wiki_lines
    assert not any(line in text for line in wiki_lines)


@pytest.mark.skipif(not (WIKITEXT / "wiki.test.raw").exists(), reason="WikiText-2 test split not present")
def test_wikipedia_training_text_is_not_the_evaluation_set():
    """The 'wiki' text is Wikipedia too, so lines are not enough: no shared article, no shared 13 words."""
    raw = (WIKITEXT / "wiki.test.raw").read_text(encoding="utf-8")
    titles = {t.strip() for t in re.findall(r"^ = ([^=].*?) = *$", raw, re.M)}
    assert len(titles) > 50
    wiki = load_documents("wiki")
    leads = [d[:200] for d in wiki]
    assert not any(lead.startswith(t + " ") for t in titles for lead in leads if len(t) > 6)

    def words(s: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", s.lower())  # WikiText's " @-@ " and spaced punctuation drop out

    n = 13
    ev = words(raw)
    eval_grams = {tuple(ev[i : i + n]) for i in range(len(ev) - n + 1)}
    tr = words("\n".join(wiki))
    assert len(tr) > 400_000
    assert not any(tuple(tr[i : i + n]) in eval_grams for i in range(len(tr) - n + 1))


def test_file_directory_and_jsonl_sources(tmp_path, tok, caplog):
    (tmp_path / "a.txt").write_text("The object is a class and the function is a method . " * 20)
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "first record about modules"}) + "\n\n" + json.dumps({"text": "second record"}) + "\n"
    )
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    assert load_documents(tmp_path / "b.jsonl") == ["first record about modules", "second record"]
    assert len(load_documents(tmp_path)) == 3
    with caplog.at_level(logging.INFO, logger="llmquant.calibration"):
        batches = calibration_batches(tok, tmp_path, nsamples=10, seqlen=50)
    assert len(batches) == 10 and all(b.shape == (1, 50) for b in batches)
    assert any("overlapping" in r.getMessage() for r in caplog.records)  # ~230 tokens: 4 disjoint windows only
    assert len(calibration_batches(tok, str(tmp_path / "a.txt"), nsamples=2, seqlen=16)) == 2


def test_errors_are_clear(tmp_path, tok):
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(ValueError, match=r"has 2 tokens, fewer than one sequence of seqlen=64"):
        calibration_batches(tok, tmp_path / "short.txt", nsamples=1, seqlen=64)
    with pytest.raises(ValueError, match="not 'builtin', 'news', 'pydoc', 'wiki', 'hf:<dataset>' or an existing path"):
        calibration_batches(tok, "wikitxt", nsamples=1)
    with pytest.raises(ValueError, match="nsamples must be positive"):
        calibration_batches(tok, nsamples=0)
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: expected an object with a string field 'text'"):
        load_documents(tmp_path / "bad.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no .txt/.md/.jsonl files"):
        load_documents(tmp_path / "empty")


def test_hf_source_without_datasets_is_a_clear_error(tok, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ValueError, match=r"needs the `datasets` package \(pip install 'llmquant\[eval\]'\)"):
        calibration_batches(tok, "hf:allenai/c4:en", nsamples=1)


def test_hf_source_offline_is_a_clear_error(tok, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="could not load dataset 'allenai/c4'.*use source='builtin'"):
        calibration_batches(tok, "hf:allenai/c4:en", nsamples=1)
