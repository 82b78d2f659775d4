"""Scoring steered generations (method.md section 6, "Evaluation"; the paper's judge rates topic
and coherence 0-5 and reports topic x coherence, or (1 - topic) x coherence when suppressing).

saeflow scores offline with calibrated automatic measures, and can add a judge through any
OpenAI-compatible endpoint (``judge``):
  - topic: cosine between the continuation's sentence embedding and the theme centroid (mean
    embedding of half of the theme paragraphs), mapped linearly so the mean of background-corpus
    snippets is 0 and the mean of the other half of the theme paragraphs is 1, clipped to [0, 1].
    Topic measures *content*: the words of the theme's own description ("wedding", "weddings"
    for "weddings"; ``theme_stems``) are removed from every text before it is embedded, the centroid's
    and the calibration snippets' too, so saying "wedding" three times is not a text about
    weddings; the bride, the vows and the reception still are. Calibration snippets are cut to
    the generations' length (``snippet_words`` words), as short texts embed less sharply.
  - coherence: two measures under the *unsteered* model, each mapped linearly so corpus snippets
    (natural text) are 1 and the same snippets with shuffled tokens (word salad) are 0:
    the continuation's mean per-token NLL given its context, and its *context gain*, the
    context-free NLL (the model's next-token distribution after a document separator alone)
    minus that NLL. NLL alone passes salad of frequent words ("have. team. are are have"),
    gain alone passes salad of rare tokens; the worse of the two, clipped to [0, 1], is
    multiplied by (1 - repetition). The context is always the bare prompt (``score_records``
    in ``saeflow.evaluate``), also for the prompting baseline, whose instruction would
    otherwise make its continuations likelier than the others'. Continuations under 4 tokens
    score 0.
  - repetition = 1 - (1 - trigram) (1 - unigram): ``trigram`` the share of repeated token
    trigrams (loops); ``unigram`` the share of repeated content words (1 - distinct-1 over
    ``content_words``: 3+ letters, not a stop word) above its level in natural snippets of the
    same length (~0.05 on the corpus), rescaled so that half of the content words being
    repeats (``UNIGRAM_FULL``) gives 1. "It is a wedding. It is a wedding day. It was a nice
    wedding." repeats "wedding" in three of five content words (0.40, unigram term 0.78), where
    30-word corpus snippets average 0.06 (90th percentile 0.18). Repetitive text has a low NLL
    and a high gain, so only this term catches it.
Both calibrations are deterministic given their inputs; with a ``saeflow.memo.Memo`` they are
stored under them (the model's fingerprint or the embedder's name, a hash of the texts, the
settings and the seed) and a later call reads them back instead of measuring again.
"""

from __future__ import annotations

import json
import math
import random
import re
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from saeflow.compute import pad_batch
from saeflow.memo import Memo, model_fingerprint, texts_digest

MIN_TOKENS = 4
TOPIC_VERSION = 1  # bumped when calibrate_topic measures something else (the memo keys)
COHERENCE_VERSION = 1  # the same for calibrate_coherence
UNIGRAM_FULL = 0.5  # half of the content words repeat earlier ones: the unigram term is 1
STOPWORDS = frozenset(
    "the a an and or but of to in on at for with by from as is are was were be been being it its "
    "this that these those he she they we you i his her their our your my me him them us not no "
    "so if then than there here what which who whom when where why how all any each some such "
    "into over under about after before up down out off again very can will just do does did "
    "have has had would could should may might must also only more most other one two get got "
    "let said says say like".split())


# ---- words --------------------------------------------------------------------------------------
def snippet(text: str, words: int) -> str:
    return " ".join(text.split()[:words])


def content_words(text: str) -> list[str]:
    """Lowercased words of 3+ letters that are not stop words."""
    return [w for w in re.findall(r"[a-z']+", text.lower()) if len(w) >= 3 and w not in STOPWORDS]


def theme_stems(description: str) -> tuple[str, ...]:
    """Prefixes of the description's content words that mark them and their inflections: a
    plural s is dropped and words of 7+ letters lose up to two letters, keeping at least six
    ("weddings" -> "weddin", "religion" -> "religi", "sports" -> "sport")."""
    out = []
    for w in content_words(description):
        w = w[:-1] if len(w) > 4 and w.endswith("s") and not w.endswith("ss") else w
        out.append(w[:max(6, len(w) - 2)] if len(w) > 6 else w)
    return tuple(dict.fromkeys(out))


def mask_words(text: str, stems: Sequence[str]) -> str:
    """``text`` without the words that start with one of ``stems`` (case-insensitive)."""
    if not stems:
        return text
    pattern = re.compile(r"\b(?:" + "|".join(map(re.escape, stems)) + r")[\w']*", re.I)
    return re.sub(r"\s+", " ", pattern.sub("", text)).strip()


# ---- topic --------------------------------------------------------------------------------------
@dataclass
class TopicScorer:
    embed: Callable[[Sequence[str]], Tensor]
    theme_D: Tensor  # unit centroid
    background_mean: float
    theme_mean: float
    stems: tuple[str, ...] = ()  # the theme's own words, masked before embedding

    def similarity(self, texts: Sequence[str]) -> Tensor:
        return self.embed([mask_words(t, self.stems) for t in texts]) @ self.theme_D

    def __call__(self, texts: Sequence[str]) -> list[float]:
        if not texts:
            return []
        sim = self.similarity(texts)
        z = ((sim - self.background_mean) / (self.theme_mean - self.background_mean)).clamp(0, 1)
        return [0.0 if not mask_words(t, self.stems).strip() else float(v)
                for t, v in zip(texts, z)]

    def info(self) -> dict:
        return {"background_mean": self.background_mean, "theme_mean": self.theme_mean,
                "masked_stems": list(self.stems)}


def calibrate_topic(theme_texts: Sequence[str], background: Sequence[str], embed,
                    snippet_words: int = 30, description: str | None = None,
                    memo: Memo | None = None) -> TopicScorer:
    """See the module docstring (``description``: the theme, whose words are masked); raises
    when theme text is not nearer the theme than background. With ``memo`` (and a named
    embedder) the centroid and both means are stored under the texts, the embedder and the
    settings, and read back on the next call."""
    stems = theme_stems(description) if description else ()

    def anchors() -> dict:
        texts = [mask_words(t, stems) for t in theme_texts]
        half_a, half_b = (texts[0::2], texts[1::2]) if len(texts) >= 2 else (texts, texts)
        c = embed(half_a).mean(0)
        c = c / c.norm().clamp_min(1e-12)
        mu_t = float((embed([snippet(t, snippet_words) for t in half_b]) @ c).mean())
        bg = [mask_words(snippet(t, snippet_words), stems) for t in background]
        return {"centroid": c, "theme_mean": mu_t,
                "background_mean": float((embed(bg) @ c).mean())}
    name = getattr(embed, "name", None)
    a = anchors() if memo is None or name is None else memo("topic", {
        "version": TOPIC_VERSION, "embedder": name,
        "embed_device": getattr(embed, "device", None),
        "theme_texts": texts_digest(theme_texts), "background": texts_digest(background),
        "snippet_words": snippet_words, "stems": list(stems)}, anchors)
    mu_t, mu_b = a["theme_mean"], a["background_mean"]
    if not mu_t > mu_b + 1e-3:
        raise ValueError(f"theme snippets are not nearer the theme than background snippets "
                         f"(cosine {mu_t:.3f} vs {mu_b:.3f}); give better theme examples")
    return TopicScorer(embed, a["centroid"], mu_b, mu_t, stems)


# ---- repetition ---------------------------------------------------------------------------------
def repetition(seq: str | Sequence) -> float:
    """Share of repeated trigrams of ``seq`` (a text's words, or token ids): 0 for text without
    repeats, near 1 for loops."""
    items = seq.lower().split() if isinstance(seq, str) else list(seq)
    grams = [tuple(items[i:i + 3]) for i in range(len(items) - 2)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


def unigram_repetition(text: str) -> float:
    """1 - distinct / all content words of ``text`` (0 with fewer than 2 content words)."""
    words = content_words(text)
    return 0.0 if len(words) < 2 else 1.0 - len(set(words)) / len(words)


def repetition_penalty(trigram: float, unigram: float, natural_unigram: float) -> float:
    """The combined repetition of the module docstring, in [0, 1]."""
    top = max(UNIGRAM_FULL, natural_unigram + 0.1)
    excess = max(0.0, unigram - natural_unigram) / (top - natural_unigram)
    return 1.0 - (1.0 - trigram) * (1.0 - min(1.0, excess))


# ---- coherence ----------------------------------------------------------------------------------
@torch.no_grad()
def continuation_nll(lm, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                     batch_size: int = 8) -> list[float]:
    """Mean NLL (nats/token) of each continuation given its prompt, ``(prompt_ids, new_ids)``."""
    pad = getattr(lm.tokenizer, "pad_token_id", None) or 0
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = [(list(p), list(n)) for p, n in pairs[start:start + batch_size]]
        seqs = [p + n for p, n in chunk]
        ids, mask = pad_batch(seqs, pad, device=lm.device)
        logp = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        logp = logp.log_softmax(-1)
        for i, (p, n) in enumerate(chunk):
            if not n:
                out.append(float("nan"))
                continue
            pos = torch.arange(len(p) - 1, len(p) + len(n) - 1, device=lm.device)
            tgt = torch.tensor(n, device=lm.device)
            out.append(float(-logp[i, pos, tgt].mean()))
    return out


@torch.no_grad()
def context_free_logprobs(lm) -> Tensor:
    """The model's next-token log-probabilities after a document separator alone, [vocab]: a
    unigram model of the language as the model sees it."""
    tok = lm.tokenizer
    cands = (tok.get_vocab().get("<|endoftext|>"), getattr(tok, "eos_token_id", None),
             getattr(tok, "bos_token_id", None), 0)
    ids = torch.tensor([[int(next(c for c in cands if c is not None))]], device=lm.device)
    return lm.model(input_ids=ids, use_cache=False).logits[0, -1].float().log_softmax(-1).cpu()


class Coherence(NamedTuple):
    coherence: list[float]
    nll: list[float]  # nats/token under the unsteered model, given the context
    gain: list[float]  # context-free NLL minus nll: how much the context explains the text
    repetition: list[float]  # combined repetition (module docstring)
    trigram: list[float]  # share of repeated token trigrams
    unigram: list[float]  # 1 - distinct / all content words


@dataclass
class CoherenceScorer:
    lm: object
    unigram_V: Tensor  # context_free_logprobs(lm)
    natural_nll: float
    shuffled_nll: float
    natural_gain: float
    shuffled_gain: float
    natural_unigram: float = 0.0  # unigram repetition of natural snippets of the same length
    decode: Callable[[Sequence[int]], str] | None = field(default=None, repr=False)

    def _text(self, ids: Sequence[int]) -> str:
        if self.decode is not None:
            return self.decode(ids)
        return self.lm.tokenizer.decode(list(ids), skip_special_tokens=True)  # type: ignore

    def __call__(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> Coherence:
        """Scores of continuations given as ``(context_ids, new_ids)``."""
        nll = continuation_nll(self.lm, pairs)
        gain = [float(-self.unigram_V[list(n)].mean()) - x if n else float("nan")
                for (_, n), x in zip(pairs, nll)]
        tri = [repetition(n) for _, n in pairs]
        uni = [unigram_repetition(self._text(n)) for _, n in pairs]
        rep = [repetition_penalty(t, u, self.natural_unigram) for t, u in zip(tri, uni)]
        coh = []
        for (_, n), x, g, r in zip(pairs, nll, gain, rep):
            if len(n) < MIN_TOKENS or math.isnan(x):
                coh.append(0.0)
                continue
            by_nll = (self.shuffled_nll - x) / (self.shuffled_nll - self.natural_nll)
            by_gain = (g - self.shuffled_gain) / (self.natural_gain - self.shuffled_gain)
            coh.append(min(1.0, max(0.0, min(by_nll, by_gain))) * (1.0 - r))
        return Coherence(coh, nll, gain, rep, tri, uni)

    def info(self) -> dict:
        return {"natural_nll": self.natural_nll, "shuffled_nll": self.shuffled_nll,
                "natural_gain": self.natural_gain, "shuffled_gain": self.shuffled_gain,
                "natural_unigram_repetition": self.natural_unigram}


def calibrate_coherence(lm, texts: Sequence[str], n_tokens: int = 36, prompt_tokens: int = 2,
                        seed: int = 0, memo: Memo | None = None) -> CoherenceScorer:
    """NLL and gain anchors: corpus snippets of ``n_tokens`` tokens and token-shuffled copies;
    the natural level of content-word repetition from the same snippets. With ``memo`` the
    anchors and the context-free log-probabilities are stored under the model's fingerprint,
    the texts and the settings, and read back on the next call (no forward pass)."""
    def anchors() -> dict:
        return coherence_anchors(lm, texts, n_tokens, prompt_tokens, seed)
    a = anchors() if memo is None else memo("coherence", {
        "version": COHERENCE_VERSION, "model": model_fingerprint(lm),
        "texts": texts_digest(texts), "n_tokens": n_tokens, "prompt_tokens": prompt_tokens,
        "seed": seed}, anchors)
    nat, shuf, nat_g, shuf_g = (a[k] for k in ("natural_nll", "shuffled_nll", "natural_gain",
                                               "shuffled_gain"))
    if not (shuf > nat + 0.1 and nat_g > shuf_g + 0.1):
        raise ValueError(f"shuffled text is not less likely than natural text under {lm.name} "
                         f"(NLL {shuf:.2f} vs {nat:.2f}, gain {shuf_g:.2f} vs {nat_g:.2f}): "
                         "coherence cannot be calibrated")
    return CoherenceScorer(lm, a["unigram"], nat, shuf, nat_g, shuf_g, a["natural_unigram"])


def coherence_anchors(lm, texts: Sequence[str], n_tokens: int, prompt_tokens: int,
                      seed: int) -> dict:
    """What ``calibrate_coherence`` measures: mean NLL and gain of natural and shuffled
    snippets, their natural unigram repetition and ``context_free_logprobs``."""
    rng = random.Random(seed)
    natural, shuffled = [], []
    for t in texts:
        ids = lm.tokenizer(t, add_special_tokens=False)["input_ids"][:n_tokens + prompt_tokens]
        if len(ids) < prompt_tokens + MIN_TOKENS:
            continue
        p, n = ids[:prompt_tokens], ids[prompt_tokens:]
        natural.append((p, n))
        shuffled.append((p, rng.sample(n, len(n))))
    if len(natural) < 2:
        raise ValueError("coherence calibration needs at least 2 texts of a few tokens")
    uni = context_free_logprobs(lm)

    def means(pairs):
        nll = continuation_nll(lm, pairs)
        gain = [float(-uni[n].mean()) - x for (_, n), x in zip(pairs, nll)]
        return sum(nll) / len(nll), sum(gain) / len(gain)
    (nat, nat_g), (shuf, shuf_g) = means(natural), means(shuffled)
    words = [unigram_repetition(lm.tokenizer.decode(n, skip_special_tokens=True))
             for _, n in natural]
    return {"natural_nll": nat, "shuffled_nll": shuf, "natural_gain": nat_g,
            "shuffled_gain": shuf_g, "natural_unigram": sum(words) / len(words), "unigram": uni}


# ---- optional judge -----------------------------------------------------------------------------
JUDGE_PROMPT = ("Rate the text below on two scales from 0 to 5.\n"
                "topic: how much the text is about {theme} (0 = not at all, 5 = entirely).\n"
                "coherence: how fluent and coherent the text is (0 = gibberish, 5 = perfect).\n"
                'Answer with JSON only, like {{"topic": 3, "coherence": 4}}.\n\nText:\n{text}')


def chat_endpoint(url: str) -> str:
    """``url`` with the ``/chat/completions`` path an OpenAI-compatible server answers on."""
    endpoint = url.rstrip("/")
    return endpoint if endpoint.endswith("/chat/completions") else endpoint + "/chat/completions"


def chat_completion(url: str, model: str, text: str, api_key: str | None = None,
                    timeout: float = 60.0) -> str:
    """The reply of an OpenAI-compatible chat endpoint (``url``, with or without its
    ``/chat/completions`` path) to one user message, at temperature 0."""
    endpoint = chat_endpoint(url)
    body = {"model": model, "temperature": 0, "messages": [{"role": "user", "content": text}]}
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(endpoint, json.dumps(body).encode(), headers)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())["choices"][0]["message"]["content"]


def judge(url: str, model: str, theme: str, text: str, api_key: str | None = None,
          timeout: float = 60.0) -> tuple[float, float]:
    """(topic, coherence) in [0, 1] from an OpenAI-compatible chat endpoint."""
    reply = chat_completion(url, model, JUDGE_PROMPT.format(theme=theme, text=text), api_key,
                            timeout)
    m = re.search(r"\{.*?\}", reply, re.S)
    try:
        d = json.loads(m.group(0)) if m else {}
        return (min(5.0, max(0.0, float(d["topic"]))) / 5,
                min(5.0, max(0.0, float(d["coherence"]))) / 5)
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"judge {model} at {chat_endpoint(url)} gave no topic/coherence JSON: "
                         f"{reply[:200]!r}") from None
