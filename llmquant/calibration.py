"""Calibration token sequences for data-aware quantizers (GPTQ).

``calibration_batches(tokenizer, source, nsamples, seqlen, seed)`` returns ``nsamples`` int64 tensors of
shape [1, seqlen], cut at random positions out of one long token stream. Sources:

* ``"builtin"`` (default) or ``"news"``: the Lee corpus, 300 English news articles of the Australian
  Broadcasting Corporation (about 360 kB, ~80k tokens for typical tokenizers), as the ``gensim``
  wheel ships it (``gensim/test/test_data/lee_background.cor``; the extra ``calibration``, read as a
  file, never imported). General prose, nothing to download or commit, and deliberately *not*
  WikiText-2, which is the evaluation set. Its sha256 is checked, so calibration sequences are
  reproducible. On gemma3-270m it calibrates GPTQ far better than technical text: INT4 g128 with
  act-order reaches perplexity 36.2 against 40.2 with ``"pydoc"`` (see ``evals/results``).
* ``"pydoc"``: the English prose of the Python documentation's topic pages, which ships with every
  Python as ``pydoc_data.topics`` (about 0.5 MB); technical text, for machines without the corpus
  above. Its content follows the Python version.
* ``"wiki"``: 106 English Wikipedia articles (Anarchism to Algorithm, about 2.8 MB of plain text, ~600k
  tokens) from the dump excerpt in the same gensim wheel's test data (``enwiki-latest-pages-articles1.xml-
  p000000010p000030302-shortened.bz2``, sha256 checked), markup stripped with ``mwparserfromhell``;
  citations, tables, image captions and the reference sections are dropped. Encyclopedic prose like
  the evaluation text but other articles: none of WikiText-2's test articles is among them and the
  two texts share no 13-word sequence (checked by ``tests/quantizers/test_calibration.py``). Meant as
  training text for :mod:`llmquant.distill` (about 8 times the news corpus); 10-15 s to read (once per process).
  It also calibrates GPTQ better than the news corpus, on another domain too: rotated GPTQ INT3 g128 with
  float targets on gemma3-270m raised Python-docs perplexity by 54% against 113% with the news corpus
  (``evals/results/calibration_text_gemma3-270m-*``).
* a path: a text file (``.jsonl`` files: one JSON object per line, its ``"text"`` field), or a directory
  whose ``*.txt``, ``*.md`` and ``*.jsonl`` files are read in name order.
* ``"hf:<dataset>[:<config>][:<split>]"``: a Hugging Face dataset's ``"text"`` column (split ``train``
  unless given), through the ``datasets`` library; needs it installed and network (or cache) access.

Documents are tokenized separately without special tokens and joined with a blank line. If the
tokenizer normally starts a sequence with BOS (or ``bos=True`` is passed), every calibration sequence
starts with BOS followed by ``seqlen - 1`` tokens of the stream, so the model sees what it sees at
inference. Windows do not
overlap when the stream holds at least ``nsamples`` of them; otherwise they are drawn at random start
positions (overlapping) and this is logged.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import random
import re
from pathlib import Path
from typing import Any
from collections.abc import Iterable

import torch

logger = logging.getLogger(__name__)

_TEXT_SUFFIXES = (".txt", ".md", ".jsonl")

#: the news corpus inside the gensim wheel, and the sha256 of the file this llmquant was tuned with
NEWS_PACKAGE = "gensim"
NEWS_FILE = "test/test_data/lee_background.cor"
NEWS_SHA256 = "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb"
#: an excerpt of an English Wikipedia dump in the same wheel's test data, and its sha256
WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"


def _package_file(package: str, rel: str, sha256: str, what: str, instead: str = "") -> bytes:
    """The bytes of ``rel`` inside the installed ``package`` (found, not imported), checked against ``sha256``."""
    import hashlib
    import importlib.util

    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the built-in {what} comes with the {package!r} package, which is not installed: "
            "pip install 'llmquant[calibration]' (or use --calibration pydoc, or a text file)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"the built-in {what} {path} cannot be read ({e}); reinstall {package}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ValueError(
            f"the built-in {what} {path} has sha256 {digest}, expected {sha256}: a different "
            f"{package} version? pip install {package}==4.4.0{instead}"
        )
    return data


def news_documents() -> list[str]:
    """The Lee news corpus (one article per line) from the installed gensim package's files."""
    data = _package_file(NEWS_PACKAGE, NEWS_FILE, NEWS_SHA256, "calibration corpus", ", or pass the file explicitly")
    return [line for line in data.decode("utf-8").splitlines() if line.strip()]


#: sections at the end of an article that are lists of sources and links, not prose
_WIKI_SKIPPED_SECTIONS = frozenset(
    {"references", "see also", "external links", "notes", "further reading", "bibliography", "sources",
     "footnotes", "citations"}
)
#: tags whose content is not running text (citations, tables, galleries, formulas)
_WIKI_SKIPPED_TAGS = frozenset({"ref", "references", "gallery", "table", "math", "timeline", "imagemap"})
#: the first end-matter heading, found on the raw text (an unclosed template elsewhere can hide headings
#: from the parser)
_WIKI_END_MATTER = re.compile(
    rf"^==\s*(?:{'|'.join(re.escape(n) for n in sorted(_WIKI_SKIPPED_SECTIONS))})\b[^=\n]*==\s*$", re.M | re.I
)


def _wiki_plain_text(wikitext: str) -> str:
    """One article's running text: markup stripped, citations, tables, images and categories dropped."""
    import mwparserfromhell

    # the end matter (see also, references, further reading, links) is lists, not prose: cut it off
    end = _WIKI_END_MATTER.search(wikitext)
    code = mwparserfromhell.parse(wikitext[: end.start()] if end else wikitext)
    for node in code.filter_tags(recursive=True):
        if str(node.tag).strip().lower() in _WIKI_SKIPPED_TAGS:
            try:
                code.remove(node)
            except ValueError:  # already gone with an enclosing node
                pass
    for link in code.filter_wikilinks(recursive=True):
        # File:, Image:, Category: and interlanguage links ("de:Anarchismus") carry no running text
        if re.match(r"^\s*[A-Za-z\-]{2,12}\s*:", str(link.title)):
            try:
                code.remove(link)
            except ValueError:
                pass
    text = _wiki_leftovers(code.strip_code(normalize=True, collapse=True))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _wiki_leftovers(text: str) -> str:
    """What the parser leaves as text where the markup is malformed (an unclosed table or citation)."""
    text = re.sub(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = re.sub(r"\{\{[^{}]*\}\}", "", text)
    text = re.sub(r"\[\[[A-Za-z]+:[^\[\]]*\]\]", "", text)  # File:/Image: links
    text = re.sub(r"\[\[(?:[^\[\]|]*\|)?([^\[\]]*)\]\]", r"\1", text)  # [[target|label]] -> label
    text = re.sub(r"'{2,}", "", text)  # bold and italic quotes
    lines = [ln for ln in text.split("\n") if not re.match(r"\s*(\{\||\|\}|\|-|\||!)", ln)]  # table rows
    return "\n".join(lines)


def wiki_documents() -> list[str]:
    """The English Wikipedia articles of the dump excerpt in gensim's test data, as plain text."""
    return list(_wiki_documents(WIKI_SHA256))


@functools.lru_cache(maxsize=1)
def _wiki_documents(sha256: str) -> tuple[str, ...]:
    """(Parsing takes 10-15 s; kept once per process, keyed by the checksum it was read against.)"""
    import bz2
    import xml.etree.ElementTree as ET

    try:
        import mwparserfromhell  # noqa: F401
    except ImportError:
        raise ValueError(
            "the 'wiki' training text needs the mwparserfromhell package to strip Wikipedia markup: "
            "pip install 'llmquant[calibration]'"
        ) from None
    data = _package_file(NEWS_PACKAGE, WIKI_FILE, sha256, "Wikipedia excerpt")
    root = ET.fromstring(bz2.decompress(data))  # a checked file of ours, not user input
    ns = root.tag.split("}")[0] + "}" if root.tag.startswith("{") else ""
    docs = []
    for page in root.iter(f"{ns}page"):
        if page.find(f"{ns}redirect") is not None or page.findtext(f"{ns}ns") != "0":
            continue  # redirects and talk, user or template pages
        text = _wiki_plain_text(page.findtext(f"{ns}revision/{ns}text") or "")
        if text.strip():
            docs.append(text)
    return tuple(docs)


def pydoc_documents() -> list[str]:
    """The topic pages of Python's own documentation."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def builtin_documents() -> list[str]:
    """The default calibration text (the news corpus)."""
    return news_documents()


def _read_file(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        docs = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise ValueError(f"{path}:{lineno}: expected an object with a string field 'text'")
                docs.append(rec["text"])
        return docs
    return [path.read_text(encoding="utf-8")]


def _path_documents(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"calibration directory {path} has no {'/'.join(_TEXT_SUFFIXES)} files")
        return [d for p in files for d in _read_file(p)]
    return _read_file(path)


def _hf_documents(spec: str) -> list[str]:
    parts = spec.split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    if not name:
        raise ValueError("calibration source 'hf:' needs a dataset name: 'hf:<dataset>[:<config>][:<split>]'")
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"calibration source 'hf:{spec}' needs the `datasets` package (pip install 'llmquant[eval]') and network "
            "access; use source='builtin' or a local text file instead"
        ) from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown dataset, bad split: all mean the same to the caller
        raise ValueError(
            f"calibration source 'hf:{spec}': could not load dataset {name!r} (config {config!r}, split {split!r}): "
            f"{type(e).__name__}: {e}. Without network access use source='builtin' or a local text file"
        ) from e
    if "text" not in ds.column_names:
        raise ValueError(f"calibration source 'hf:{spec}': dataset has no 'text' column (columns: {ds.column_names})")
    return [t for t in ds["text"] if t and t.strip()]


def load_documents(source: str | os.PathLike) -> list[str]:
    """The documents of a calibration ``source`` (see the module docstring)."""
    if isinstance(source, str) and source in ("builtin", "news"):
        docs = news_documents()
    elif isinstance(source, str) and source == "pydoc":
        docs = pydoc_documents()
    elif isinstance(source, str) and source == "wiki":
        docs = wiki_documents()
    elif isinstance(source, str) and source.startswith("hf:"):
        docs = _hf_documents(source[3:])
    else:
        path = Path(source)
        if not path.exists():
            raise ValueError(
                f"calibration source {str(source)!r} is not 'builtin', 'news', 'pydoc', 'wiki', 'hf:<dataset>' or an existing path"
            )
        docs = _path_documents(path)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"calibration source {str(source)!r} has no text")
    return docs


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _leading_bos(tokenizer: Any) -> int | None:
    """The BOS id if the tokenizer starts sequences with it by default, else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = list(tokenizer("a")["input_ids"])
    return bos if ids[:1] == [bos] else None


def _bos_id(tokenizer: Any, bos: bool | None) -> int | None:
    """The id each sequence starts with: ``None`` follows the tokenizer's default, ``True`` demands BOS."""
    if bos is None:
        return _leading_bos(tokenizer)
    if not bos:
        return None
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        raise ValueError("bos=True but the tokenizer has no bos_token_id")
    return bos_id


def token_stream(tokenizer: Any, documents: Iterable[str]) -> list[int]:
    sep = _encode(tokenizer, "\n\n")
    stream: list[int] = []
    for doc in documents:
        if stream:
            stream.extend(sep)
        stream.extend(_encode(tokenizer, doc))
    return stream


def calibration_batches(
    tokenizer: Any,
    source: str | os.PathLike = "builtin",
    nsamples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    bos: bool | None = None,
) -> list[torch.Tensor]:
    """``nsamples`` token sequences, each int64 [1, seqlen], from ``source`` (see the module docstring).

    ``tokenizer``: a transformers tokenizer (anything callable as ``tokenizer(text,
    add_special_tokens=False)["input_ids"]`` with an optional ``bos_token_id``).
    ``bos``: start every sequence with the BOS token; ``None`` (default) does what the tokenizer does
    by default (see also :func:`llmquant.models.bos_for_raw_text`).
    """
    if nsamples <= 0:
        raise ValueError(f"nsamples must be positive, got {nsamples}")
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, got {seqlen}")
    stream = token_stream(tokenizer, load_documents(source))
    bos_id = _bos_id(tokenizer, bos)
    body = seqlen - 1 if bos_id is not None else seqlen
    if len(stream) < body:
        raise ValueError(
            f"calibration source {str(source)!r} has {len(stream)} tokens, fewer than one sequence of "
            f"seqlen={seqlen}"
        )
    rng = random.Random(seed)
    n_windows = len(stream) // body
    if n_windows >= nsamples:
        offset = rng.randrange(len(stream) - n_windows * body + 1)
        starts = [offset + j * body for j in rng.sample(range(n_windows), nsamples)]
    else:
        logger.info(
            "calibration source %r has %d tokens, room for %d disjoint sequences of %d; drawing %d overlapping ones",
            str(source), len(stream), n_windows, seqlen, nsamples,
        )
        starts = [rng.randrange(len(stream) - body + 1) for _ in range(nsamples)]
    prefix = [bos_id] if bos_id is not None else []
    return [torch.tensor([prefix + stream[s:s + body]], dtype=torch.int64) for s in starts]


def training_windows(
    tokenizer: Any,
    source: str | os.PathLike = "builtin",
    seqlen: int = 256,
    bos: bool | None = None,
) -> torch.Tensor:
    """Every disjoint window of ``seqlen`` tokens of ``source``, in stream order: int64 [N, seqlen].

    The training text of distillation and recovery (:mod:`llmquant.distill`): the same sources and
    BOS rule as :func:`calibration_batches`, but all of the text, cut once, so that an epoch sees each
    token once. ``source`` may list several sources joined with ``+`` (``"news+pydoc"``).
    """
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, got {seqlen}")
    docs: list[str] = []
    for part in str(source).split("+"):
        docs.extend(load_documents(part))
    stream = token_stream(tokenizer, docs)
    bos_id = _bos_id(tokenizer, bos)
    body = seqlen - 1 if bos_id is not None else seqlen
    n = len(stream) // body
    if n == 0:
        raise ValueError(f"training text {str(source)!r} has {len(stream)} tokens, fewer than one window of {seqlen}")
    rows = torch.tensor(stream[: n * body], dtype=torch.int64).view(n, body)
    if bos_id is not None:
        rows = torch.cat([torch.full((n, 1), bos_id, dtype=torch.int64), rows], dim=1)
    return rows
