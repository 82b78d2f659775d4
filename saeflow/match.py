"""Data-free matching of SAE features: blocked cosine top-k and permutation matching.

Implements "Analyze Feature Flow" sec. 3 (top-k decoder cosine between two SAEs, no data) and
"Mechanistic Permutability" sec. 3 (one-to-one matching of two equal-width SAEs by a linear
assignment problem on folded decoder rows).

Cosine top-k, ``cosine_topk(queries, keys, k)``:
  1. rows are normalised in fp32; the similarity matrix is computed tile by tile
     (``block`` x ``block``), so memory is bounded by the tile, never by Q x K;
  2. with ``precision="bf16"`` the tiles are bf16 matmuls (fast on CPUs with AVX512-BF16/AMX)
     and each row keeps a shortlist of its best ``k + shortlist`` keys;
  3. the leading candidates are re-scored in fp32 and the top-1 is *certified*: a key outside
     the re-scored set can beat it only if its bf16 score is within a rigorous error bound
     (bf16 rounding of both inputs by Cauchy-Schwarz, fp32 accumulation, bf16 rounding of the
     output) of the winner; rows that cannot be certified re-score the whole shortlist, and
     rows that still cannot are recomputed exactly in fp32. So the top-1 index and value always
     equal the exact fp32 answer; ranks 2..k are the best of the re-scored candidates (exact
     fp32 values). ``precision="auto"`` uses bf16 when bf16 matmuls are fast here
     (``compute.bf16_is_fast``, a one-off measurement) and rows are >= 1024 wide (below that,
     selection and re-scoring cost more than the faster products save).
``cosine_topk_pair`` gets both directions (a -> b and b -> a) from the same tiles. What
happens after each tile's product (the running shortlists of rows and columns, the fp32
re-scoring) is ``saeflow.match_kernels``: compiled (numba) by default, ``kernels="torch"`` for
the plain path (``topk`` per tile and a ``cat`` + ``topk`` merge); both give the same top-1 and
the same shortlist scores.

Permutation matching, ``permutation_match(sae_a, sae_b)``: fold JumpReLU thresholds, then
minimise the total squared distance between matched decoder rows (plus encoder columns with
``use_encoder``). Squared distance = |a|^2 + |b|^2 - 2 a.b and the norms are constant over
perfect matchings, so the solvers maximise sum a.b. ``dense`` uses scipy's
``linear_sum_assignment`` on the full cost matrix (memory 8 F^2 bytes); ``sparse`` keeps the
``knn`` nearest neighbours in both directions and runs ``min_weight_full_bipartite_matching``.
If that kNN graph has no perfect matching, a maximum matching of the graph is completed by a
dense assignment among the left-over rows and columns, those edges are added, and the sparse
solver runs again: the result is then optimal among the kNN edges plus the completion edges
(reported as solver ``sparse+completion``).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from saeflow import match_kernels
from saeflow.compute import bf16_is_fast, bf16_speedup  # noqa: F401  (re-exported)
from saeflow.configs import DEFAULT_BLOCK
from saeflow.sae import SAE
from saeflow.sites import Site

DEFAULT_SHORTLIST = 16
_U = 2.0 ** -8  # bf16 unit roundoff


class TopK(NamedTuple):
    values: Tensor  # [Q, k] float32, best first
    indices: Tensor  # [Q, k] int64


class Permutation(NamedTuple):
    perm: Tensor  # [F] int64: perm[i] = the feature of b matched to feature i of a
    cost: float  # total squared distance between matched (folded) rows
    mean_cos: float  # mean cosine between matched decoder rows
    solver: str  # "dense", "sparse" or "sparse+completion"
    seconds: float


# ---- precision ---------------------------------------------------------------------------
def resolve_precision(precision: str = "auto", d: int | None = None) -> str:
    """``auto`` is bf16 when bf16 matmuls are fast here (``compute.bf16_is_fast``) and rows are
    at least 1024 wide; below that the shortlist's selection and re-scoring outweigh the faster
    products."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    if precision == "auto":
        if d is not None and d < 1024:
            return "fp32"
        return "bf16" if bf16_is_fast() else "fp32"
    return precision


# ---- blocked top-k -------------------------------------------------------------------------
def _unit(x: Tensor) -> Tensor:
    x = x.detach().to(torch.float32)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


class Operand:
    """One side of a product, prepared once and reusable across pairs: fp32 rows [n, D], an
    optional per-row score bias, the bf16 copy, and the norms the error bound needs.
    ``Operand.cosine(x, precision)`` holds unit rows. Big temporaries are built in chunks
    (fresh multi-MB allocations cost page faults that rival the arithmetic on small machines)."""

    def __init__(self, x: Tensor, bias: Tensor | None = None, precision: str = "auto"):
        self.x = x.detach().to(torch.float32).contiguous()
        self.precision = resolve_precision(precision, self.x.shape[-1])
        if self.x.ndim != 2:
            raise ValueError(f"matching needs a 2-d [n, d] matrix, got shape {tuple(x.shape)}")
        self.bias = None if bias is None else bias.detach().to(torch.float32)
        self.norm = self.x.norm(dim=1)
        self.low, self.err = None, torch.zeros(len(self.x))
        if self.precision == "bf16":
            self.low = torch.empty(self.x.shape, dtype=torch.bfloat16)
            for s in range(0, len(self.x), 4096):
                chunk = self.x[s:s + 4096]
                low = self.low[s:s + 4096]
                low.copy_(chunk)
                self.err[s:s + 4096] = (chunk - low.float()).norm(dim=1)

    @classmethod
    def cosine(cls, x: Tensor, precision: str = "auto") -> Operand:
        """Unit rows of ``x`` (no copy when ``x`` already holds fp32 unit rows)."""
        x = x.detach()
        if x.dtype != torch.float32 or not x.is_contiguous() or x.ndim != 2 or not bool(
                ((x.norm(dim=1) - 1).abs() < 1e-6).all()):
            x = _unit(x)
        return cls(x, None, precision)

    def __len__(self) -> int:
        return len(self.x)

    def rows(self, i: int, n: int) -> Operand:
        out = object.__new__(Operand)
        out.precision, out.x, out.bias = self.precision, self.x[i:i + n], self.bias
        out.norm, out.err = self.norm[i:i + n], self.err[i:i + n]
        out.low = None if self.low is None else self.low[i:i + n]
        return out

    def scores(self, rows: Tensor | None, other: Operand, cols: Tensor | None = None,
               kernels: str = "auto") -> Tensor:
        """Exact fp32 scores of ``rows`` (None: all rows) against the ``other`` rows ``cols``
        [n, c], or against all of ``other`` when ``cols`` is None."""
        if cols is None:
            q = self.x if rows is None else self.x[rows]
            s = q @ other.x.T
            return s if other.bias is None else s + other.bias
        out = match_kernels.rescore(self.x, other.x, cols, rows, kernels)
        return out if other.bias is None else out + other.bias[cols]


def _bound(q: Operand, rows: Tensor, k: Operand, t: Tensor) -> Tensor:
    """Upper bound on (exact - bf16) score of rows of q against any row of k whose bf16 score
    is at most t: input rounding (Cauchy-Schwarz), fp32 accumulation, output rounding."""
    kmax, kerr = k.norm.max(), k.err.max()
    nq = q.norm[rows]
    acc = q.x.shape[1] * 2.0 ** -24 * nq * kmax * 1.01
    out_round = 1.01 * _U * (t.abs() if k.bias is None else nq * kmax)
    return q.err[rows] * kmax + nq * kerr + acc + out_round + 1e-7


def _finish(q: Operand, k: Operand, vals: Tensor, idx: Tensor, n_keep: int, exact: bool,
            stats: dict, kernels: str = "auto") -> TopK:
    """Shortlists (approximate scores, best first) -> final top-``n_keep`` with fp32 values."""
    if exact:  # fp32 tiles: the shortlist is the answer
        return TopK(vals[:, :n_keep].contiguous(), idx[:, :n_keep].contiguous())
    Q, S = idx.shape
    everyone = torch.arange(Q)
    all_keys = S >= len(k.x)  # the shortlist holds every key
    r = min(max(n_keep, 5), S)
    out_v, out_i = q.scores(None, k, idx[:, :r], kernels), idx[:, :r].clone()
    if r == S and all_keys:
        bad = torch.zeros(Q, dtype=torch.bool)
    else:  # every candidate that was not re-scored has a bf16 score <= t
        t = vals[:, r] if r < S else vals[:, S - 1]
        bad = out_v.max(1).values < t + _bound(q, everyone, k, t)
    bad_rows = bad.nonzero().flatten()
    stats["rows"] = stats.get("rows", 0) + Q
    stats["rescored"] = stats.get("rescored", 0) + len(bad_rows)
    if len(bad_rows):
        ex = q.scores(bad_rows, k, idx[bad_rows], kernels)  # the whole shortlist
        top = ex.topk(r, dim=1)
        out_v[bad_rows], out_i[bad_rows] = top.values, idx[bad_rows].gather(1, top.indices)
        if not all_keys:
            t2 = vals[bad_rows, S - 1]
            full = bad_rows[ex.max(1).values < t2 + _bound(q, bad_rows, k, t2)]
            stats["exact_rows"] = stats.get("exact_rows", 0) + len(full)
            for c in range(0, len(full), 512):
                rr = full[c:c + 512]
                top = q.scores(rr, k).topk(r, dim=1)
                out_v[rr], out_i[rr] = top.values, top.indices
    top = out_v.topk(n_keep, dim=1)
    return TopK(top.values.contiguous(), out_i.gather(1, top.indices).contiguous())


def _pair_pass(sa: Operand, sb: Operand, k: int, block: int, shortlist: int, cols: bool,
               stats: dict | None = None, kernels: str = "auto") -> tuple[TopK, TopK | None]:
    """Top-k of a's rows over b (score a.b + b.bias) and, with ``cols``, of b's rows over a
    (score a.b + a.bias), from one tiled pass over a @ b.T."""
    stats = {} if stats is None else stats
    if sa.x.shape[1] != sb.x.shape[1]:
        raise ValueError(f"matching needs two [n, d] matrices of the same width d, got shapes "
                         f"{tuple(sa.x.shape)} and {tuple(sb.x.shape)}")
    if len(sa) == 0 or len(sb) == 0:
        raise ValueError("matching needs at least one row on each side")
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive integer, got {block!r}")
    if sa.precision != sb.precision:
        raise ValueError(f"operands prepared with different precisions: {sa.precision}, "
                         f"{sb.precision}")
    kernels = match_kernels.resolve(kernels)
    bf16 = sa.precision == "bf16"
    stats["precision"], stats["kernels"] = sa.precision, kernels
    ka, kb = min(k, len(sb)), min(k, len(sa))
    keep_a = min(ka + (shortlist if bf16 else 0), len(sb))
    keep_b = min(kb + (shortlist if bf16 else 0), len(sa))
    A_, B_ = (sa.low, sb.low) if bf16 else (sa.x, sb.x)
    assert A_ is not None and B_ is not None
    lists = match_kernels.Shortlists(len(sa), len(sb), keep_a, keep_b if cols else None,
                                     sb.bias, sa.bias, block, kernels)
    tile_buf = torch.empty(min(block, len(sa)) * min(block, len(sb)), dtype=A_.dtype)
    for i in range(0, len(sa), block):
        qa = A_[i:i + block]
        for j in range(0, len(sb), block):
            kb_ = B_[j:j + block]
            lists.add(torch.matmul(qa, kb_.T, out=tile_buf[:len(qa) * len(kb_)].view(
                len(qa), -1)), i, j)
    del tile_buf
    fwd = _finish(sa, sb, *lists.rows(), ka, not bf16, stats, kernels)
    if not cols:
        return fwd, None
    return fwd, _finish(sb, sa, *lists.cols(), kb, not bf16, stats, kernels)


def _operand(x: Tensor | Operand, precision: str) -> Operand:
    if isinstance(x, Operand):
        return x
    if not isinstance(x, Tensor) or x.ndim != 2:
        raise ValueError(f"matching needs a 2-d [n, d] tensor, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    return Operand.cosine(x, precision)


def cosine_topk(queries_QD: Tensor | Operand, keys_KD: Tensor | Operand, k: int = 1,
                block: int = DEFAULT_BLOCK, precision: str = "auto",
                shortlist: int = DEFAULT_SHORTLIST, kernels: str = "auto") -> TopK:
    """For each query row, the ``k`` key rows of highest cosine (inputs need not be unit norm).
    Values are fp32 cosines; the top-1 is always the exact fp32 answer (module docstring).
    Either side may be an ``Operand.cosine(...)`` prepared once and reused. ``kernels``:
    "auto" (compiled when numba is installed), "numba" or "torch" (``saeflow.match_kernels``)."""
    _check_k(k)
    fwd, _ = _pair_pass(_operand(queries_QD, precision), _operand(keys_KD, precision), k, block,
                        shortlist, False, None, kernels)
    return fwd


def cosine_topk_pair(a_AD: Tensor | Operand, b_BD: Tensor | Operand, k: int = 1,
                     block: int = DEFAULT_BLOCK, precision: str = "auto",
                     shortlist: int = DEFAULT_SHORTLIST, stats: dict | None = None,
                     kernels: str = "auto") -> tuple[TopK, TopK]:
    """``(cosine_topk(a, b, k), cosine_topk(b, a, k))`` computed from one pass over the tiles.
    ``stats`` (a dict) receives how many rows needed re-scoring or an exact fp32 recompute."""
    _check_k(k)
    fwd, back = _pair_pass(_operand(a_AD, precision), _operand(b_BD, precision), k, block,
                           shortlist, True, stats, kernels)
    return fwd, back


def _check_k(k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


# ---- residual-basis decoders ---------------------------------------------------------------
def residual_decoder(suite_or_sae, site: Site | str | None = None, lm=None) -> Tensor:
    """Unit decoder rows of the SAE at ``site`` in the residual basis, ``[F, d_model]``.
    ``att_z`` decoders (o_proj inputs) are mapped through the model's W_O, so ``lm`` is needed."""
    if isinstance(suite_or_sae, SAE):
        sae = suite_or_sae
        site = Site.parse(site) if site is not None else sae.site
    else:
        if site is None:
            raise ValueError("residual_decoder(suite, site): a site is needed with a suite")
        site = Site.parse(site)
        sae = suite_or_sae[site]
    if site is not None and site.kind == "att_z":
        if lm is None:
            raise ValueError(f"the SAE at {site} reads the attention output before o_proj "
                             "(att_z); its decoder reaches the residual stream only through the "
                             "model's W_O, so pass a loaded model (lm=...)")
        return _unit(lm.att_z_to_residual(site.layer, sae.W_dec.to(torch.float32)))
    return sae.unit_decoder(torch.float32)


# ---- permutation matching ------------------------------------------------------------------
def _perm_vectors(sae: SAE, use_encoder: bool) -> Tensor:
    """Rows of the folded SAE: decoder row (and encoder column) per feature, [F, d or 2d]."""
    if use_encoder:
        f = sae.fold()
        return torch.cat([f.W_dec.to(torch.float32), f.W_enc.to(torch.float32).T], dim=1)
    x = sae.W_dec.to(torch.float32)
    if sae.activation == "jumprelu":  # SAE.fold's decoder, without copying the encoder
        theta = sae.threshold.to(torch.float32)
        x = x * torch.where(theta > 0, theta, torch.ones_like(theta))[:, None]
    return x.contiguous()


def permutation_match(sae_a: SAE, sae_b: SAE, use_encoder: bool = False, solver: str = "auto",
                      knn: int = 16, dense_limit: int = 20_000, block: int = DEFAULT_BLOCK,
                      precision: str = "auto") -> Permutation:
    """One-to-one matching of two equal-width SAEs (module docstring). ``solver`` is ``dense``,
    ``sparse`` or ``auto`` (dense up to ``dense_limit`` features)."""
    from scipy.optimize import linear_sum_assignment

    if sae_a.d_sae != sae_b.d_sae:
        raise ValueError(f"permutation matching needs SAEs of equal width, got {sae_a.d_sae} "
                         f"({sae_a.source}) and {sae_b.d_sae} ({sae_b.source})")
    if sae_a.d_in != sae_b.d_in:
        raise ValueError(f"permutation matching needs SAEs of the same input width, got "
                         f"{sae_a.d_in} and {sae_b.d_in}")
    if solver not in ("auto", "dense", "sparse"):
        raise ValueError(f"solver must be auto, dense or sparse, got {solver!r}")
    t0 = time.perf_counter()
    A, B = _perm_vectors(sae_a, use_encoder), _perm_vectors(sae_b, use_encoder)
    F = len(A)
    if solver == "dense" or (solver == "auto" and F <= dense_limit):
        cost = np.empty((F, F), dtype=np.float64)
        for i in range(0, F, block):
            cost[i:i + block] = (-(A[i:i + block] @ B.T)).numpy()
        _, perm = linear_sum_assignment(cost)
        del cost
        used = "dense"
    else:
        perm, used = _sparse_assignment(A, B, knn, block, precision)
    perm_t = torch.as_tensor(perm, dtype=torch.long)
    total, cos_sum = 0.0, 0.0
    for s in range(0, F, 8192):  # in chunks: at 65k features each full copy is 0.6 GB
        a, b = A[s:s + 8192], B[perm_t[s:s + 8192]]
        total += float(((a - b).double() ** 2).sum())
        da = sae_a.W_dec[s:s + 8192].to(torch.float32)
        db = sae_b.W_dec[perm_t[s:s + 8192]].to(torch.float32)
        cos_sum += float(torch.nn.functional.cosine_similarity(da, db, dim=1, eps=1e-12).sum())
    return Permutation(perm_t, total, cos_sum / F, used, time.perf_counter() - t0)


def _sq_norms(x: Tensor) -> Tensor:
    """Squared row norms in float64 [n], chunked (no float64 copy of x)."""
    return torch.cat([(c.double() ** 2).sum(1) for c in x.split(8192)])


def _sparse_assignment(A: Tensor, B: Tensor, knn: int, block: int, precision: str):
    """Min-cost perfect matching on the union of both directions' kNN graphs (by squared
    distance), completed when that graph has no perfect matching (module docstring)."""
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import maximum_bipartite_matching, min_weight_full_bipartite_matching

    F = len(A)
    na2, nb2 = _sq_norms(A), _sq_norms(B)
    # the nearest b of a maximises a.b - |b|^2/2, the nearest a of b maximises a.b - |a|^2/2;
    # the returned top-k values are exact fp32, so d^2 = |a|^2 - 2 * value (resp. |b|^2 - ...)
    fwd, back = _pair_pass(Operand(A, -(na2 / 2).float(), precision),
                           Operand(B, -(nb2 / 2).float(), precision), min(knn, F), block,
                           DEFAULT_SHORTLIST, True)
    kf, kb = fwd.indices.shape[1], back.indices.shape[1]
    r_f = torch.arange(F).repeat_interleave(kf)
    c_b = torch.arange(F).repeat_interleave(kb)
    rows = np.concatenate([r_f.numpy(), back.indices.flatten().numpy()])
    cols = np.concatenate([fwd.indices.flatten().numpy(), c_b.numpy()])
    w = np.concatenate([(na2[r_f] - 2 * fwd.values.flatten().double()).numpy(),
                        (nb2[c_b] - 2 * back.values.flatten().double()).numpy()])

    def graph(rows, cols, w):
        key, first = np.unique(rows.astype(np.int64) * F + cols, return_index=True)
        shift = 1.0 - min(0.0, float(w.min()))  # LAPJVsp needs non-zero weights
        return coo_matrix((w[first] + shift, (key // F, key % F)), shape=(F, F)).tocsr()

    g = graph(rows, cols, w)
    try:
        return min_weight_full_bipartite_matching(g)[1], "sparse"
    except ValueError:
        pass
    match = maximum_bipartite_matching(g, perm_type="column")  # match[i] = column or -1
    free_r = np.flatnonzero(match < 0)
    free_c = np.setdiff1d(np.arange(F), match[match >= 0])
    sub = torch.cdist(A[free_r].double(), B[free_c].double()) ** 2
    _, j = linear_sum_assignment(sub.numpy())
    rows = np.concatenate([rows, free_r])
    cols = np.concatenate([cols, free_c[j]])
    w = np.concatenate([w, sub.numpy()[np.arange(len(j)), j]])
    return min_weight_full_bipartite_matching(graph(rows, cols, w))[1], "sparse+completion"
