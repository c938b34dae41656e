"""Perplexity on WikiText-2 (raw, test split) with a fixed, recorded protocol.

Protocol
--------
* The corpus file is read as bytes, decoded as UTF-8 and tokenized once, whole, without special
  tokens. Its sha256 is recorded (WikiText-2 raw test: ``4f3e427e…4103c``).
* ``max_tokens`` (optional) keeps the first that many corpus tokens: the declared slice.
* Windows of ``context`` corpus tokens start every ``stride`` tokens (``stride == context``: the
  usual non-overlapping protocol of GPTQ/AWQ papers). With ``bos`` the tokenizer's BOS token is put
  before each window, so every window token is scored; without it the first token of a window is
  only context. With ``stride < context``, a window scores only the tokens not scored before
  (sliding-window perplexity); the first window scores all it can.
* ppl = exp(mean negative log-likelihood over all scored tokens), computed in float64 from float32
  log-softmax.

Every result carries that protocol, the number of tokens scored, wall time and tokens/s.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

WIKITEXT2_SHA256 = "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"
CORPUS_ENV = "LLMQUANT_WIKITEXT2"


@dataclass(frozen=True)
class Protocol:
    corpus: str
    corpus_sha256: str
    context: int
    stride: int
    bos: bool
    max_tokens: int | None
    batch_size: int = 1


@dataclass(frozen=True)
class Window:
    ids: torch.Tensor  # int64 [T] model input (BOS included when used)
    first_scored: int  # index in ``ids`` of the first position whose *next* token is scored


#: where the text comes from when no local file is found (the Hugging Face dataset, parquet rows
#: that are the raw file's lines, newlines included)
HF_DATASET = ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")
#: dataset download failures worth a clear message (no network, offline mode, hub unreachable)
_FETCH_ERRORS = (OSError, ConnectionError, ValueError, RuntimeError)


def _checkout_candidates() -> list[Path]:
    """``shared/data/wikitext-2-raw/wiki.test.raw`` beside (or inside) the folders above this file."""
    here = Path(__file__).resolve()
    out = []
    for up in here.parents[:4]:
        out.append(up.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw")
        out.append(up / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw")
    return out


def cached_corpus_path() -> Path:
    from llmquant.models import cache_dir

    return cache_dir() / "data" / "wikitext-2-raw" / "wiki.test.raw"


def find_corpus(path: str | os.PathLike | None = None) -> Path:
    """The WikiText-2 raw test file: ``path``, else ``$LLMQUANT_WIKITEXT2``, else the ``shared/data``
    folder beside this checkout, else the copy downloaded earlier into llmquant's cache. Raises
    FileNotFoundError saying where it looked."""
    candidates = [Path(path)] if path is not None else []
    if path is None:
        if os.environ.get(CORPUS_ENV):
            candidates.append(Path(os.environ[CORPUS_ENV]))
        candidates += _checkout_candidates()
        candidates.append(cached_corpus_path())
    tried = []
    for c in candidates:
        c = c / "wiki.test.raw" if c.is_dir() else c
        tried.append(str(c))
        if c.is_file():
            return c
    raise FileNotFoundError("WikiText-2 raw test not found. Looked at: " + ", ".join(dict.fromkeys(tried)))


def fetch_corpus() -> Path:
    """Download WikiText-2 raw test with ``datasets`` (extra ``eval``) into llmquant's cache, check its
    sha256, and return the cached file. Raises FileNotFoundError saying exactly what to do otherwise."""
    from llmquant.fsutil import atomic_write_bytes

    target = cached_corpus_path()
    fixes = (f"pass --corpus PATH/wiki.test.raw (or set {CORPUS_ENV}=PATH); or, with a network, "
             "pip install 'llmquant[eval]' and run again: the text is then downloaded once from the Hugging "
             f"Face dataset {HF_DATASET[0]} ({HF_DATASET[1]}, {HF_DATASET[2]}) into {target}")
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise FileNotFoundError(f"WikiText-2 raw test is not on this machine and the 'datasets' package (extra "
                                f"'eval') is not installed to fetch it. To fix: {fixes}") from None
    try:
        import datasets

        rows = datasets.load_dataset(*HF_DATASET[:2], split=HF_DATASET[2])["text"]
    except _FETCH_ERRORS as e:
        raise FileNotFoundError(f"WikiText-2 raw test is not on this machine and downloading it failed "
                                f"({type(e).__name__}: {str(e)[:300]}). To fix: {fixes}") from None
    raw = "".join(rows).encode("utf-8")
    sha = hashlib.sha256(raw).hexdigest()
    if sha != WIKITEXT2_SHA256:
        raise FileNotFoundError(f"the downloaded WikiText-2 test split has sha256 {sha}, not the raw file's "
                                f"{WIKITEXT2_SHA256}: results would not be comparable. To fix: {fixes}")
    atomic_write_bytes(target, raw)
    logger.info("downloaded WikiText-2 raw test (%d bytes) to %s", len(raw), target)
    return target


def ensure_corpus(path: str | os.PathLike | None = None) -> Path:
    """The corpus file: ``path``, or one that :func:`find_corpus` finds, else the download of
    :func:`fetch_corpus` (cached for later runs). Commands call this before their slow part."""
    try:
        return find_corpus(path)
    except FileNotFoundError as e:
        if path is not None:
            raise
        try:
            return fetch_corpus()
        except FileNotFoundError as fetch_error:
            raise FileNotFoundError(f"{fetch_error} ({e})") from None


def load_corpus(path: str | os.PathLike | None = None) -> tuple[str, str, str]:
    """(text, sha256, source path) of :func:`ensure_corpus`."""
    p = ensure_corpus(path)
    raw = p.read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    if sha != WIKITEXT2_SHA256:
        logger.warning("%s has sha256 %s, not WikiText-2 raw test's; results are not comparable", p, sha)
    return raw.decode("utf-8"), sha, str(p)


def tokenize_corpus(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(tokens: torch.Tensor, context: int, stride: int, bos_id: int | None) -> Iterator[Window]:
    if context < 2 or stride < 1 or stride > context:
        raise ValueError(f"need context >= 2 and 1 <= stride <= context, got context={context}, stride={stride}")
    n = tokens.numel()
    scored_until = 0  # corpus tokens [0, scored_until) are scored already
    start = 0
    while start < n:
        end = min(start + context, n)
        chunk = tokens[start:end]
        if bos_id is not None:
            ids = torch.cat([torch.tensor([bos_id]), chunk])
            # position i of ids predicts corpus token start + i
            first = max(scored_until - start, 0)
        else:
            ids = chunk
            # position i predicts corpus token start + i + 1
            first = max(scored_until - start - 1, 0)
        if first < ids.numel() - 1:
            yield Window(ids, first)
        scored_until = end
        if end == n:
            break
        start += stride


def prepare(tokenizer, corpus, context: int, stride: int | None, bos: bool, max_tokens: int | None):
    """(protocol, corpus tokens, windows) for one evaluation run."""
    text, sha, source = load_corpus(corpus)
    tokens = tokenize_corpus(tokenizer, text)
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    stride = context if stride is None else stride
    bos_id = tokenizer.bos_token_id if bos else None
    if bos and bos_id is None:
        raise ValueError("bos=True but the tokenizer has no BOS token")
    proto = Protocol(source, sha, context, stride, bos, max_tokens)
    return proto, tokens, list(windows(tokens, context, stride, bos_id))


def window_nll(model, win: Window) -> tuple[float, int, torch.Tensor]:
    """(sum of NLL, tokens scored, log-probs [T_scored, V]) for one window."""
    ids = win.ids.unsqueeze(0).to(next(model.parameters()).device)
    logits = model(ids).logits[0, :-1].float()
    logp = F.log_softmax(logits[win.first_scored :], dim=-1)
    target = ids[0, win.first_scored + 1 :]
    nll = -logp.gather(1, target.unsqueeze(1)).squeeze(1)
    return float(nll.double().sum()), target.numel(), logp


def perplexity(
    model,
    tokenizer,
    *,
    corpus: str | os.PathLike | None = None,
    context: int = 512,
    stride: int | None = None,
    bos: bool = True,
    max_tokens: int | None = None,
    progress: bool = True,
    label: str = "",
) -> dict:
    """Score ``model`` on WikiText-2; returns a JSON-ready dict with the protocol and the result."""
    proto, tokens, wins = prepare(tokenizer, corpus, context, stride, bos, max_tokens)
    total, count = 0.0, 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        bar = tqdm(wins, desc=f"ppl {label}".strip(), unit="win", disable=not progress)
        for w in bar:
            s, c, _ = window_nll(model, w)
            if not math.isfinite(s):
                raise FloatingPointError(f"non-finite loss in a window starting at token {w.ids[:4].tolist()}...")
            total += s
            count += c
            bar.set_postfix(ppl=f"{math.exp(total / count):.3f}")
    wall = time.perf_counter() - t0
    return {
        "model": label,
        "protocol": asdict(proto),
        "corpus_tokens": int(tokens.numel()),
        "tokens_scored": count,
        "nll": total / count,
        "ppl": math.exp(total / count),
        "wall_s": wall,
        "tokens_per_s": count / wall if wall > 0 else float("nan"),
    }


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table of ``rows`` with (header, key) columns; floats get 4 significant decimals."""

    def cell(v):
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(k, "")) for _, k in columns) + " |")
    return "\n".join(lines)


def write_json(path: str | os.PathLike, obj) -> None:
    from llmquant.fsutil import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")
