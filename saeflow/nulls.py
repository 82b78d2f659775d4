"""Null distributions for lineage scores: the best match a feature gets from a source by chance.

"Analyze Feature Flow" sec. 3.2 calls a score s = max_k cos(f, W_dec(source)[k]) high or low
with thresholds "specific for each layer" and gives no procedure. saeflow compares each score
with a null: the same max cosine for directions that look like the layer's features but are
tied to no source feature. Each sampler returns ``n`` such max cosines (float32 [n]):

  gaussian (default)  directions drawn from a Gaussian with the mean and covariance of the
                      target decoder's unit rows, then normalised. Real decoders share a mean
                      direction and a few high-variance directions; a score must beat what that
                      shared geometry alone gives. Sampled as ``mu + z @ (X - mu) / sqrt(F - 1)``
                      with ``z ~ N(0, I_F)`` (exactly that Gaussian, no d x d factorisation).
  rotation            target rows after a Haar-random rotation (the earlier default). It keeps
                      the target's norms and the source intact but removes the shared geometry,
                      so it is too lenient on real decoders (SmolLM2: 0.18-0.19 at every layer,
                      94-99% of residual features "high" on s(R)).
  reference           rows of another SAE of the target's site (an independently seeded one):
                      real geometry, no Gaussian assumption. Such an SAE also shares many of
                      the site's features, so this null is conservative (it calls fewer scores
                      high than a null of truly unrelated directions would).
"""

from __future__ import annotations

import torch
from torch import Tensor

from saeflow.configs import NULLS

__all__ = ["NULLS", "gaussian_directions", "null_scores", "random_rotation"]



def _unit(x: Tensor) -> Tensor:
    x = x.to(torch.float32)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def random_rotation(d: int, seed: int = 0) -> Tensor:
    """A Haar-random orthogonal matrix [d, d] (QR of a Gaussian matrix, signs fixed)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(torch.float32)


def gaussian_directions(rows_FD: Tensor, n: int, seed: int = 0, chunk: int = 512) -> Tensor:
    """``n`` unit directions [n, D] from the Gaussian with the mean and covariance of the unit
    rows of ``rows_FD``."""
    if len(rows_FD) < 2:
        raise ValueError(f"a Gaussian null needs at least 2 decoder rows, got {len(rows_FD)}")
    X = _unit(rows_FD)
    mu = X.mean(0)
    Xc = (X - mu) / (len(X) - 1) ** 0.5
    g = torch.Generator().manual_seed(seed)
    out = [mu + torch.randn(min(chunk, n - i), len(X), generator=g) @ Xc
           for i in range(0, n, chunk)]
    return _unit(torch.cat(out)) if out else torch.zeros(0, X.shape[1])


def null_scores(targets_FD: Tensor, source, n: int = 2048, seed: int = 0, block: int = 4096,
                kind: str = "gaussian", reference_FD: Tensor | None = None) -> Tensor:
    """Null samples of the score against ``source`` (a tensor [F_s, D] or a prepared
    ``match.Operand``) for features like ``targets_FD``: float32 [n] (at most the number of
    rows for ``rotation`` and ``reference``, which sample rows without replacement)."""
    from saeflow.match import cosine_topk

    if kind not in NULLS:
        raise ValueError(f"unknown null {kind!r}; known: {', '.join(NULLS)}")
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        t = gaussian_directions(targets_FD, n, seed + 1)
    elif kind == "rotation":
        pick = torch.randperm(len(targets_FD), generator=g)[:min(n, len(targets_FD))]
        t = targets_FD[pick].to(torch.float32) @ random_rotation(targets_FD.shape[1], seed + 1)
    else:
        if reference_FD is None:
            raise ValueError("the reference null needs the rows of a reference SAE of the site")
        if reference_FD.shape[1] != targets_FD.shape[1]:
            raise ValueError(f"reference rows are {reference_FD.shape[1]}-d, the targets "
                             f"{targets_FD.shape[1]}-d: not the same site's basis")
        pick = torch.randperm(len(reference_FD), generator=g)[:min(n, len(reference_FD))]
        t = reference_FD[pick].to(torch.float32)
    precision = getattr(source, "precision", "auto")
    return cosine_topk(t, source, k=1, block=block, precision=precision).values[:, 0]
