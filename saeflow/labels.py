"""Feature labels people can read: what a feature fires on, what it promotes, what Neuronpedia says.

The papers label nothing ("Analyze Feature Flow" reads features through Neuronpedia's pages);
saeflow gives every feature up to three readings, and one label built from them:
  1. **fires on** (the default): the distinct tokens at which the feature's top activating
     contexts peak (``saeflow.contexts``, a small pass over the bundled corpus stored with the
     atlas), most frequent first, ties by activation; plus a snippet of its best context.
  2. **promotes** (data-free, the second line): the tokens its decoder row promotes most
     through the unembedding, final norm gain applied (the logit lens). In middle layers these
     are often noise, hence not the default.
  3. **Neuronpedia's explanation**, when the explanation exports of the suite's sources are in
     a local folder (``saeflow.neuronpedia.read_explanations``).
The label is the explanation, else the fires-on tokens, else the promoted tokens.
Promoted tokens come from ``saeflow.lens`` (an unembedding prepared once for every site).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from saeflow.configs import ContextSettings
from saeflow.io import atomic_path, write_bytes
from saeflow.sites import Site

SEP = " · "
# contexts computed with an atlas: 64 sequences of 128 tokens (a TopK SAE with k=32 of 2,304
# features fires ~110 times per feature in 8k tokens); `saeflow contexts` reads more
DEFAULT_CONTEXTS = ContextSettings(n_tokens=8192, seq_len=128, batch_size=8, top_k=8)
_US = "\x1f"  # between the stored strings of one feature


class FeatureLabels(NamedTuple):
    """Every reading of one feature (``Atlas.labels(f)``); strings are "" where there is none."""
    label: str  # what to show: the explanation, else fires_on, else promotes
    fires_on: str  # distinct peak tokens of the top activating contexts, "a · b · c"
    context: str  # the best context around its peak token, "...the «religious» leaders"
    promotes: str  # promoted tokens (logit lens), "a · b · c"
    explanation: str  # Neuronpedia's description

    def lines(self) -> tuple[str, str]:
        """Two display lines: the label (with the snippet when the label is what it fires on)
        and, beneath it, the promoted tokens (empty when they are the label already)."""
        first = self.label
        if self.context and self.label == self.fires_on:
            first = f"{self.label} — {self.context}"
        second = f"promotes {self.promotes}" if self.promotes and self.label != self.promotes \
            else ""
        return first, second


def join_tokens(tokens: list[str]) -> str:
    """Tokens as one short label; a token that is only whitespace shows as its repr."""
    return SEP.join(t.strip() or repr(t) for t in tokens)


def choose(explanation: str, fires_on: str, promotes: str) -> str:
    return explanation or fires_on or promotes


# ---- stored strings (labels/{slug}.bin + .off.npy) ----------------------------------------
def write_strings(folder: Path, site: Site, rows: list[list[str]]) -> None:
    """Per feature a list of strings, as one utf-8 blob (``\\x1f``-separated) and offsets; the
    offsets file is written last and marks the site done."""
    folder.mkdir(parents=True, exist_ok=True)
    blobs = [_US.join(t).encode("utf-8") for t in rows]
    off = np.zeros(len(blobs) + 1, dtype=np.int64)
    off[1:] = np.cumsum([len(b) for b in blobs])
    write_bytes(folder / f"{site.slug}.bin", b"".join(blobs))
    with atomic_path(folder / f"{site.slug}.off.npy") as tmp:
        np.save(tmp, off)


class Strings:
    """The reader of ``write_strings``' files (memory-mapped): ``strings[i]`` is feature i's
    list of strings ([] past the end)."""

    def __init__(self, folder: Path, site: Site):
        self.off = np.load(folder / f"{site.slug}.off.npy", mmap_mode="r")
        self.blob = (np.memmap(folder / f"{site.slug}.bin", dtype=np.uint8, mode="r")
                     if self.off[-1] > 0 else np.zeros(0, np.uint8))

    def __len__(self) -> int:
        return len(self.off) - 1

    def __getitem__(self, i: int) -> list[str]:
        if not 0 <= i < len(self):
            return []
        raw = bytes(self.blob[int(self.off[i]):int(self.off[i + 1])])
        return raw.decode("utf-8", errors="replace").split(_US) if raw else []


def read_strings(folder: Path, site: Site) -> Strings | None:
    return Strings(folder, site) if (folder / f"{site.slug}.off.npy").exists() else None


def write_explanations(out: Path, ids, root: str | Path, sites) -> int:
    """Neuronpedia's explanations of ``sites`` (``ids``: ``neuronpedia.NeuronpediaIds``) read
    under ``root`` into ``out/labels/explanations``; returns how many features got one."""
    from saeflow.neuronpedia import read_explanations
    n = 0
    for site in sites:
        source = ids.sources.get(site)
        if source is None:
            continue
        found = read_explanations(root, ids.model_id, source)
        width = max(found, default=-1) + 1
        if not width:
            continue
        rows = [[found[i]] if i in found else [] for i in range(width)]
        write_strings(out / "labels" / "explanations", site, rows)
        n += len(found)
    return n


def store_readable(suite, out: Path, lm, *, contexts, texts, explanations,
                     progress: bool) -> float:
    """Contexts for the fires-on labels and Neuronpedia's explanations, stored in the atlas
    folder ``out`` (``atlas.compute_atlas``); returns the seconds spent."""
    t0 = time.perf_counter()
    if contexts is not None and getattr(lm, "tokenizer", None) is None:
        contexts = None  # a model without a tokenizer cannot read text: promoted tokens only
    if contexts is not None:
        from dataclasses import asdict

        from saeflow.contexts import CONTEXTS_FILE, ContextSettings, compute_contexts, read_meta
        sites = suite.sites()
        if (out / CONTEXTS_FILE).exists():  # keep what is there (e.g. `saeflow contexts`)
            old = read_meta(out / CONTEXTS_FILE)
            if old.get("complete"):
                contexts = None
            elif set(old.get("sites", [])) <= {str(s) for s in sites} and \
                    old.get("settings", {}).get("source") != "texts":
                contexts = ContextSettings(**old["settings"])
                sites = [Site.parse(s) for s in old["sites"]]
        if contexts is not None:
            if texts is not None and contexts.source != "texts":
                contexts = ContextSettings(**{**asdict(contexts), "source": "texts"})
            compute_contexts(lm, suite, out, contexts, sites=sites, texts=texts,
                             checkpoint_every=4, progress=progress)
    if explanations is not None:
        from saeflow.neuronpedia import NeuronpediaIds
        ids = NeuronpediaIds.of_suite(suite)
        if ids is None:
            raise ValueError(f"explanations {explanations}: suite {suite.name!r} names no "
                             "Neuronpedia ids (suite.json \"neuronpedia\" or the SAEs' "
                             "neuronpedia_id), so its features cannot be looked up")
        if not Path(explanations).is_dir():
            raise ValueError(f"explanations: {explanations} is not a folder (it should hold "
                             "v1/{modelId}/{source}/explanations/batch-N.jsonl.gz)")
        write_explanations(out, ids, explanations, suite.sites())
    return time.perf_counter() - t0


class LabelsMixin:
    """Label reading for ``Atlas`` (uses its ``root``, ``feature()`` and ``_labels`` cache)."""
    root: Path
    _labels: dict

    def feature(self, feature):  # provided by Atlas
        raise NotImplementedError

    def _strings(self, folder: str, site: Site):
        key = (folder, site)
        if key not in self._labels:
            self._labels[key] = read_strings(self.root / "labels" / folder if folder else
                                             self.root / "labels", site)
        return self._labels[key]

    @property
    def has_contexts(self) -> bool:
        """Whether a complete contexts file is stored with the atlas."""
        return self.contexts is not None and self.contexts.complete

    @property
    def has_explanations(self) -> bool:
        """Whether Neuronpedia explanations were stored with the atlas."""
        return (self.root / "labels" / "explanations").is_dir()

    @property
    def contexts(self):
        """The top activating contexts stored with the atlas (``contexts.Contexts``), or None."""
        if "contexts" not in self._labels:
            from saeflow.contexts import Contexts
            self._labels["contexts"] = Contexts.find(self.root)
        return self._labels["contexts"]

    def tokens(self, feature) -> list[str]:
        """The tokens the feature's decoder row promotes most (empty without labels)."""
        f = self.feature(feature)
        got = self._strings("", f.site)
        return got[f.index] if got is not None else []

    def promoted(self, feature) -> str:
        """The promoted tokens as one short string ("" without labels)."""
        return join_tokens(self.tokens(feature))

    def fires_on(self, feature) -> tuple[str, str]:
        """(its top activating tokens "a · b · c", a snippet of its best context), ("", "")
        without contexts for its site or when it never fired."""
        f = self.feature(feature)
        key = ("fires_on", f.site)
        if key not in self._labels:
            ctx = self.contexts
            self._labels[key] = fires_on(ctx, f.site) if ctx is not None else []
        rows = self._labels[key]
        return rows[f.index] if f.index < len(rows) else ("", "")

    def explanation(self, feature) -> str:
        """Neuronpedia's explanation ("" when the atlas holds none for it)."""
        f = self.feature(feature)
        got = self._strings("explanations", f.site)
        text = got[f.index] if got is not None else []
        return text[0] if text else ""

    def label(self, feature) -> str:
        """The one label to show: Neuronpedia's explanation, else what the feature fires on,
        else the tokens it promotes ("" with none of them)."""
        return self.labels(feature).label

    def labels(self, feature) -> FeatureLabels:
        """Every reading of the feature (``FeatureLabels``; ``.lines()`` gives two lines)."""
        toks, snippet = self.fires_on(feature)
        expl, promotes = self.explanation(feature), self.promoted(feature)
        return FeatureLabels(choose(expl, toks, promotes), toks, snippet, promotes, expl)


# ---- what features fire on -----------------------------------------------------------------
def _clean(text: str) -> str:
    return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())


def fires_on(contexts, site: Site, n_tokens: int = 3, before: int = 6,
             after: int = 2) -> list[tuple[str, str]]:
    """For every feature of ``site``: (its distinct peak tokens "a · b · c", a snippet of its
    best context "...before «token» after"), from a ``contexts.Contexts``; ("", "") for a
    feature that never fired (or a site without contexts)."""
    key = site.slug
    tensors = contexts._tensors
    if f"{key}/act" not in tensors:
        return []
    seq, pos = tensors[f"{key}/seq"].long(), tensors[f"{key}/pos"].long()
    act = tensors[f"{key}/act"]
    S, T = contexts.tokens.shape
    flat = contexts.tokens.reshape(-1).long()
    ok = (seq >= 0) & (pos >= 0) & (seq < S)
    peak = torch.where(ok, flat[(seq.clamp(0, S - 1) * T + pos.clamp(0, T - 1))], -1)
    strings = contexts._strings

    def word(i: int) -> str:
        return strings[i] if 0 <= i < len(strings) else ""

    out = []
    for f, (ids, row_ok) in enumerate(zip(peak.tolist(), ok.tolist())):
        if not row_ok or not row_ok[0]:
            out.append(("", ""))
            continue
        counts: Counter = Counter()
        first: dict[str, int] = {}
        shown: dict[str, str] = {}
        for j, (i, good) in enumerate(zip(ids, row_ok)):
            if not good:
                continue
            text = word(i)
            norm = text.strip().lower() or repr(text)
            counts[norm] += 1
            first.setdefault(norm, j)
            shown.setdefault(norm, text.strip() or repr(text))
        ranked = sorted(counts, key=lambda t: (-counts[t], first[t]))[:n_tokens]
        s, p = int(seq[f, 0]), int(pos[f, 0])
        row = contexts.tokens[s].tolist()
        lead = "".join(word(i) for i in row[max(0, p - before):p])
        tail = "".join(word(i) for i in row[p + 1:p + 1 + after])
        snippet = f"…{_clean(lead)} «{_clean(word(row[p]))}» {_clean(tail)}…".replace(
            "… «", "…«").replace("» …", "»…")
        out.append((SEP.join(shown[t] for t in ranked), snippet if float(act[f, 0]) > 0 else ""))
    return out


