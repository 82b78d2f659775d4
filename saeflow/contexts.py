"""Top activating contexts of SAE features, read from a text corpus.

The papers' matching is data-free; contexts are only a reading aid beside the data-free
labels (promoted tokens), shown by the viewer and searched by it. Steps:
  1. stream packed token sequences (``saeflow.corpus.token_batches``, or a list of texts);
  2. one forward pass per batch records every site (``hooks.run_sites``);
  3. each site's SAE encodes its hidden states; per feature and sequence keep the peak
     activation and its position;
  4. merge into a running top-k per feature over sequences.

Choices the papers do not make (they do not use contexts at all):
  - at most one context per sequence per feature (the peak), so the k examples differ;
  - the first token of every sequence is skipped: small models put huge norms there (SmolLM2:
    ~27,000 vs 50-700 elsewhere) and it would dominate every feature;
  - only positive activations are kept; a feature that never fires has no contexts.

Stored beside the atlas as ``contexts.safetensors``: ``tokens`` [S, T] int32 (the sequences
read), and per site ``{slug}/seq``, ``{slug}/pos`` [F, k] int32 (-1 where empty) and
``{slug}/act`` [F, k] float32, sorted by activation. The safetensors metadata holds the
settings, the progress (``batches_done``, ``complete``) and the decoded string of every token
id that occurs, so reading contexts needs no tokenizer. The file is rewritten atomically at
each checkpoint and a run resumes from it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from saeflow.configs import ContextSettings  # noqa: F401  (defined there without torch)
from saeflow.io import atomic_path
from saeflow.sites import Feature, Site

CONTEXTS_FILE = "contexts.safetensors"
FORMAT = "saeflow-contexts/1"


class Context(NamedTuple):
    before: str  # text before the peak token
    token: str  # the token where the feature peaks
    after: str  # text after it
    activation: float


# ---- pure tensor step ----------------------------------------------------------------------
def merge_topk(vals_FK: Tensor, seqs_FK: Tensor, pos_FK: Tensor, acts_BTF: Tensor,
               seq_offset: int) -> tuple[Tensor, Tensor, Tensor]:
    """Merge one batch of activations ``[B, T, F]`` (T without the skipped first token, so
    position p here is token p + 1) into a running top-k ``[F, k]`` over sequences."""
    B, T, F = acts_BTF.shape
    k = vals_FK.shape[1]
    peak_BF, arg_BF = acts_BTF.max(dim=1)
    cand_vals = torch.cat([vals_FK, peak_BF.T.float()], dim=1)  # [F, k + B]
    cand_seqs = torch.cat([seqs_FK, (torch.arange(B, dtype=torch.int32) + seq_offset)
                           .expand(F, B)], dim=1)
    cand_pos = torch.cat([pos_FK, (arg_BF.T + 1).to(torch.int32)], dim=1)
    top = cand_vals.topk(k, dim=1)
    vals = top.values
    empty = vals <= 0
    seqs = cand_seqs.gather(1, top.indices).masked_fill(empty, -1)
    pos = cand_pos.gather(1, top.indices).masked_fill(empty, -1)
    return vals.masked_fill(empty, 0.0), seqs, pos


# ---- token streams -------------------------------------------------------------------------
def pack_texts(tokenizer, texts: Sequence[str], seq_len: int, batch_size: int) -> Iterator[Tensor]:
    """Pack texts into ``[batch, seq_len]`` sequences (separated by EOS when the tokenizer
    has one); the last partial sequence is dropped unless it is the only one."""
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    n_seq = max(1, len(stream) // seq_len)
    stream = stream[: n_seq * seq_len]
    if len(stream) < seq_len:
        raise ValueError(f"contexts: the texts give {len(stream)} tokens, fewer than "
                         f"seq_len={seq_len}")
    ids = torch.tensor(stream, dtype=torch.long).view(n_seq, seq_len)
    yield from ids.split(batch_size)


def _batches(lm, settings: ContextSettings, texts: Sequence[str] | None) -> Iterator[Tensor]:
    if texts is not None:
        return pack_texts(lm.tokenizer, texts, settings.seq_len, settings.batch_size)
    from saeflow.corpus import token_batches
    return token_batches(lm.tokenizer, settings.seq_len, settings.batch_size,
                         source=settings.source, split="train", seed=settings.seed)


# ---- computing -----------------------------------------------------------------------------
def _save(path: Path, tensors: dict[str, Tensor], meta: dict) -> None:
    from safetensors.torch import save_file
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                  metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})


def _vocab_strings(tokenizer, tokens: Tensor, known: dict[str, str]) -> dict[str, str]:
    out = dict(known)
    for t in torch.unique(tokens).tolist():
        if str(t) not in out:
            out[str(t)] = tokenizer.decode([t])
    return out


@torch.no_grad()
def context_sites(atlas, suite, sites: str | None = None) -> list[Site]:
    """The sites of both the atlas and the suite, or the ``sites`` spec (e.g. ``10-14/res``),
    each of which must be in both."""
    from saeflow.sites import parse_sites
    both = [s for s in atlas.sites if s in suite]
    if sites:
        wanted = parse_sites(sites, n_layers=max(atlas.layers) + 1)
        unknown = [str(s) for s in wanted if s not in both]
        if unknown:
            raise ValueError(f"--sites: {', '.join(unknown)} not in both the atlas and the suite")
        both = wanted
    if not both:
        raise ValueError(f"the suite {suite.name!r} has none of the atlas's sites")
    return both


def compute_contexts(lm, suite, atlas_dir: str | Path, settings: ContextSettings | None = None,
                     sites: Iterable[Site | str] | None = None, texts: Sequence[str] | None = None,
                     checkpoint_every: int = 16, progress: bool = True) -> Path:
    """Compute top activating contexts for every feature of ``sites`` (default: all the
    suite's sites) and store them in ``atlas_dir/contexts.safetensors``; resumes a partial run
    with the same settings. ``texts`` replaces the corpus source. Returns the file's path."""
    from tqdm import tqdm

    from saeflow.hooks import run_sites

    settings = settings or ContextSettings()
    if texts is not None:
        settings = ContextSettings(**{**asdict(settings), "source": "texts"})
    chosen = sorted(Site.parse(s) for s in (sites if sites is not None else suite.sites()))
    if not chosen:
        raise ValueError("contexts: no sites to compute")
    missing = [str(s) for s in chosen if s not in suite]
    if missing:
        raise ValueError(f"contexts: the suite has no SAE at {', '.join(missing)}")
    folder = Path(atlas_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CONTEXTS_FILE
    meta = {"format": FORMAT, "settings": asdict(settings), "sites": [str(s) for s in chosen],
            "model": lm.name}
    k = settings.top_k
    state: dict[str, Tensor] = {}
    tokens: list[Tensor] = []
    done, vocab = 0, {}
    if path.exists():
        old = read_meta(path)
        if old.get("complete") and old.get("settings") == meta["settings"] \
                and old.get("sites") == meta["sites"]:
            return path
        if old.get("settings") == meta["settings"] and old.get("sites") == meta["sites"]:
            from safetensors.torch import load_file
            state = load_file(str(path))
            tokens = [state.pop("tokens")]
            done, vocab = int(old["batches_done"]), old.get("vocab", {})
        elif progress:
            print(f"saeflow contexts: {path} was computed with other settings or sites; "
                  "replacing it")
    for s in chosen:
        F = suite[s].d_sae
        state.setdefault(f"{s.slug}/act", torch.zeros(F, k))
        state.setdefault(f"{s.slug}/seq", torch.full((F, k), -1, dtype=torch.int32))
        state.setdefault(f"{s.slug}/pos", torch.full((F, k), -1, dtype=torch.int32))
    saes = {s: suite[s].to(device=lm.device) for s in chosen}

    def checkpoint(complete: bool):
        toks = torch.cat(tokens) if tokens else torch.zeros(0, settings.seq_len, dtype=torch.int32)
        nonlocal vocab
        vocab = _vocab_strings(lm.tokenizer, toks, vocab)
        _save(path, {"tokens": toks, **state},
              {**meta, "batches_done": str(done), "complete": "true" if complete else "false",
               "vocab": vocab})

    n_seq = sum(len(t) for t in tokens)
    bar = tqdm(total=settings.n_batches, initial=done, desc="contexts", unit="batch",
               disable=not progress)
    try:
        for i, ids in enumerate(_batches(lm, settings, texts)):
            if i >= settings.n_batches:
                break
            if i < done:
                continue
            ids = ids[:, : settings.seq_len]
            hidden = run_sites(lm, ids, chosen)
            for s in chosen:
                acts = saes[s].encode(hidden[s][:, 1:].float()).cpu()  # [B, T-1, F]
                key = s.slug
                state[f"{key}/act"], state[f"{key}/seq"], state[f"{key}/pos"] = merge_topk(
                    state[f"{key}/act"], state[f"{key}/seq"], state[f"{key}/pos"], acts, n_seq)
            tokens.append(ids.to(torch.int32).cpu())
            n_seq += len(ids)
            done = i + 1
            bar.update(1)
            if done % checkpoint_every == 0:
                checkpoint(False)
    finally:
        bar.close()
    if done == 0:
        raise ValueError(f"contexts: the source {settings.source!r} gave no token batches")
    checkpoint(True)
    return path


# ---- reading -------------------------------------------------------------------------------
def read_meta(path: str | Path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path}: not a saeflow contexts file (format {raw.get('format')!r})")
    out = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


class Contexts:
    """Read access to a ``contexts.safetensors`` file (tensors are read on first use)."""

    def __init__(self, path: str | Path):
        from safetensors.torch import load_file
        self.path = Path(path)
        self.meta = read_meta(self.path)
        self._tensors = load_file(str(self.path))
        self.tokens = self._tensors["tokens"]  # [S, T] int32
        vocab = self.meta.get("vocab", {})
        size = max([int(i) for i in vocab] + [-1]) + 1
        self._strings = [""] * size
        for i, s in vocab.items():
            self._strings[int(i)] = s
        self.sites = [Site.parse(s) for s in self.meta.get("sites", [])
                      if f"{Site.parse(s).slug}/act" in self._tensors]

    @classmethod
    def find(cls, atlas_dir: str | Path) -> Contexts | None:
        path = Path(atlas_dir) / CONTEXTS_FILE
        return cls(path) if path.exists() else None

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    def info(self) -> dict:
        return {"settings": self.meta.get("settings"), "complete": self.complete,
                "sites": [str(s) for s in self.sites], "n_sequences": int(self.tokens.shape[0]),
                "batches_done": int(self.meta.get("batches_done", 0))}

    def _text(self, ids: list[int]) -> str:
        return "".join(self._strings[i] if 0 <= i < len(self._strings) else "" for i in ids)

    def top(self, feature: Feature | str, n: int = 8, before: int = 16,
            after: int = 6) -> list[Context]:
        """The feature's top contexts, highest activation first ([] when it never fired or its
        site was not computed)."""
        f = Feature.parse(feature)
        key = f.site.slug
        if f"{key}/act" not in self._tensors:
            return []
        acts = self._tensors[f"{key}/act"]
        if f.index >= acts.shape[0]:
            raise KeyError(f"feature {f} is outside its site's width {acts.shape[0]}")
        out = []
        for j in range(min(n, acts.shape[1])):
            seq = int(self._tensors[f"{key}/seq"][f.index, j])
            pos = int(self._tensors[f"{key}/pos"][f.index, j])
            if seq < 0 or seq >= self.tokens.shape[0]:
                continue
            row = self.tokens[seq].tolist()
            out.append(Context(self._text(row[max(0, pos - before):pos]),
                               self._text([row[pos]]),
                               self._text(row[pos + 1:pos + 1 + after]),
                               float(acts[f.index, j])))
        return out

    def peak_texts(self, site: Site, n: int = 4, before: int = 3) -> list[str]:
        """For every feature of ``site``, its top-``n`` peak tokens with ``before`` tokens of
        lead-in, joined by " | " (the text the viewer's search sees)."""
        key = site.slug
        if f"{key}/act" not in self._tensors:
            return []
        seq = self._tensors[f"{key}/seq"][:, :n].long()
        pos = self._tensors[f"{key}/pos"][:, :n].long()
        S, T = self.tokens.shape
        flat = self.tokens.reshape(-1).long()
        offsets = torch.arange(-before, 1)  # [W]
        p = (pos[..., None] + offsets).clamp(min=0)  # [F, n, W]
        ids = flat[(seq.clamp(min=0)[..., None] * T + p).clamp(max=flat.numel() - 1)]
        ids = ids.masked_fill((seq < 0)[..., None] | (pos[..., None] + offsets < 0), -1)
        strings = self._strings
        out = []
        for rows in ids.tolist():
            out.append(" | ".join("".join(strings[i] for i in r if 0 <= i < len(strings))
                                  for r in rows if r[-1] >= 0))
        return out
