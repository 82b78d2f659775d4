"""The logit lens for a whole suite: the tokens every decoder row promotes, as cheap as matching.

Labels for the atlas of "Analyze Feature Flow" (the paper reads features on Neuronpedia;
saeflow's data-free reading is the logit lens: the tokens a decoder row promotes through the
unembedding, final norm gain applied). ``Unembedding(lm).promoted_many(directions, k)`` equals
``LM.promoted_tokens`` (the plain fp32 product with the whole unembedding, then top-k) for
every row. Choices:
  - the unembedding is prepared once for all sites (``match.Operand``: fp32 rows, their bf16
    copy, norms) and the queries are the decoder rows times the final norm's gain, formed as
    ``LM.lens_directions`` forms them; a layer's sites go through in one pass (larger tiles);
  - bf16 tiles (when a one-off probe finds bf16 matmuls >= 1.3x faster; the vocabulary is wide,
    so at any model width); the [features, vocab] score matrix is never formed;
  - certifying all k ranks needs more than the fixed k + 16 shortlist of ``match`` (logit-lens
    scores of ranks 6 and 22 differ by less than the bf16 error bound for two thirds of
    SmolLM2's features), so each row keeps every key within twice the rigorous bf16 error
    bound (``match._bound``) of its running k-th best (about 26 keys per row on SmolLM2); a
    tile's keys are screened by the maxima of strided groups of 8 columns, and only members of
    groups that clear the threshold are read;
  - the survivors are re-scored in fp32; a row whose k-th exact score does not beat every
    dropped key's bound, or that keeps more than ``cap`` keys (a zero direction: every key
    ties), is recomputed exactly;
  - bookkeeping runs on one thread and the products on all: on a busy machine a small op split
    over threads waits a scheduler tick for every thread (measured 16-40 ms per op at load 13,
    0.1-2 ms on one thread);
  - token strings are decoded once per distinct id.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor


class Unembedding:
    """An LM's unembedding prepared once for labelling many sites (module docstring)."""

    def __init__(self, lm, precision: str = "auto", block: int = 8192):
        from saeflow.match import Operand, bf16_speedup
        if precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
        if precision == "auto":  # the vocabulary is wide: bf16 pays at any model width
            precision = "bf16" if bf16_speedup() >= 1.3 else "fp32"
        self.lm, self.block = lm, block
        _, W_U = lm.unembed()
        self.keys = Operand(W_U.detach().cpu(), None, precision)
        self._strings: dict[int, str] = {}
        self.stats: dict = {}

    @property
    def precision(self) -> str:
        return self.keys.precision

    def ids(self, directions: Tensor, k: int) -> Tensor:
        """``[F, k]`` token ids each direction ``[F, d_model]`` promotes most, best first."""
        q = self.lm.lens_directions(directions).detach().to(torch.float32).cpu()
        return bounded_topk(q, self.keys, k=min(k, len(self.keys)), block=self.block,
                            stats=self.stats).indices

    def strings(self, ids: Tensor) -> list[list[str]]:
        rows = ids.tolist()
        missing = {t for row in rows for t in row} - self._strings.keys()
        for t in missing:
            self._strings[t] = self.lm.tokenizer.decode([t])
        return [[self._strings[t] for t in row] for row in rows]

    def promoted(self, directions: Tensor, k: int = 8) -> list[list[str]]:
        """Equal to ``LM.promoted_tokens(directions, k)``, at a fraction of its cost."""
        return self.strings(self.ids(directions, k))

    def promoted_many(self, directions: list[Tensor], k: int = 8) -> list[list[list[str]]]:
        """``promoted`` of several sites' directions in one pass over the unembedding (fewer,
        larger tiles)."""
        if not directions:
            return []
        rows = self.promoted(torch.cat([d.to(torch.float32) for d in directions]), k)
        out, at = [], 0
        for d in directions:
            out.append(rows[at:at + len(d)])
            at += len(d)
        return out


def _kth(rows: Tensor, vals: Tensor, n: int, k: int) -> tuple[Tensor, Tensor]:
    """Candidates (row ids, values) -> per row the k-th best value (-inf with fewer than k)
    and the order that sorts the candidates by row, best first."""
    order = torch.sort(vals, descending=True, stable=True).indices
    order = order[torch.sort(rows[order], stable=True).indices]
    r = rows[order]
    start = torch.zeros(n + 1, dtype=torch.long)
    start[1:] = torch.bincount(r, minlength=n).cumsum(0)
    rank = torch.arange(len(r)) - start[r]
    kth = torch.full((n,), float("-inf"))
    hit = rank == k - 1
    kth[r[hit]] = vals[order[hit]]
    return kth, order


def bounded_topk(queries: Tensor, keys, k: int, block: int = 8192, cap: int = 512,
                 stats: dict | None = None):
    """Exact fp32 top-k of ``queries @ keys.x.T`` (``keys``: a ``match.Operand``) for every
    query row, all k ranks, without the [Q, K] matrix. With fp32 keys the tiles are exact and a
    running top-k is kept (``match`` machinery). With bf16 keys each row keeps every key whose
    bf16 score is within a margin (twice the rigorous bf16 error bound of ``match._bound``) of
    its running k-th best; only strided groups of keys whose maximum clears that threshold are
    looked at. The survivors are re-scored in fp32 and the k-th exact score must beat every
    dropped key's exact bound, else (or when a row keeps more than ``cap`` keys, e.g. a zero
    direction) the row is recomputed exactly. Returns ``match.TopK``."""
    from saeflow.match import Operand, _pair_pass
    stats = {} if stats is None else stats
    q = Operand(queries, None, keys.precision)
    stats["precision"] = keys.precision
    if keys.precision != "bf16":
        return _pair_pass(q, keys, k, block, 0, False, stats)[0]
    with _threads(1) as threads:  # bookkeeping on one thread, products on all (docstring)
        return _bounded_bf16(q, keys, k, block, cap, stats, threads)


@contextmanager
def _threads(n: int):
    """Run with ``n`` intra-op threads; yields the previous count. The shortlist bookkeeping is
    many small ops: split over threads, each waits for every thread to be scheduled, which on
    a busy machine costs a scheduler tick per op (measured 16-40 ms per op under load 13,
    against 0.1-2 ms on one thread)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield old
    finally:
        torch.set_num_threads(old)


def _bounded_bf16(q, keys, k: int, block: int, cap: int, stats: dict, threads: int):
    from saeflow.match import TopK, _bound
    k = min(k, len(keys))
    Q, V = len(q), len(keys)
    out_v, out_i = torch.empty(Q, k), torch.empty(Q, k, dtype=torch.long)
    buf = torch.empty(min(block, Q) * min(block, V), dtype=torch.bfloat16)
    for i in range(0, Q, block):
        part = q.rows(i, block)
        n = len(part)
        every = torch.arange(n)
        cr, cc, cv = (torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long),
                      torch.empty(0))
        tau = margin = full = torch.empty(0)
        for j in range(0, V, block):
            kb = keys.low[j:j + block]
            with _threads(threads):
                tile = torch.matmul(part.low, kb.T, out=buf[:n * len(kb)].view(n, len(kb)))
                gm, w = _group_max(tile)
            # the k-th best group maximum is a lower bound on the k-th best score
            low = gm.topk(min(k, gm.shape[1]), dim=1).values[:, -1]
            if j == 0:
                tau = low
                margin = 2 * _bound(part, every, keys, tau.abs() * 2) + 1e-6
                full = torch.zeros(n, dtype=torch.bool)
            tau = torch.maximum(tau, low)
            r, c, v = _survivors(tile, gm, w, torch.where(full, torch.inf, tau - margin))
            cr, cc, cv = torch.cat([cr, r]), torch.cat([cc, c + j]), torch.cat([cv, v])
            over = torch.bincount(cr, minlength=n) > cap
            if over.any():  # near-ties galore (a zero direction): recompute the row exactly
                full |= over
                keep = ~full[cr]
                cr, cc, cv = cr[keep], cc[keep], cv[keep]
        kth, _ = _kth(cr, cv, n, k)  # the exact bf16 k-th best: drop what it rules out
        tau = torch.maximum(tau, kth)
        keep = cv >= (tau - margin)[cr]
        cr, cc, cv = cr[keep], cc[keep], cv[keep]
        # re-score the survivors exactly, row by row (padded to the longest list of a chunk)
        _, order = _kth(cr, cv, n, k)
        cr, cc = cr[order], cc[order]
        counts = torch.bincount(cr, minlength=n)
        width = max(int(counts.max()) if len(cr) else 0, k)
        start = torch.zeros(n, dtype=torch.long)
        start[1:] = counts.cumsum(0)[:-1]
        slot = torch.arange(len(cr)) - start[cr]
        cols = torch.zeros(n, width, dtype=torch.long)
        cols[cr, slot] = cc
        ex = torch.full((n, width), float("-inf"))
        by_count = torch.argsort(counts)
        for s in range(0, n, 512):  # rows of similar counts together: little padding
            rows = by_count[s:s + 512]
            w = max(int(counts[rows].max()), 1)
            with _threads(threads):
                got = part.scores(rows, keys, cols[rows, :w])
            ex[rows, :w] = got.masked_fill(torch.arange(w) >= counts[rows, None], float("-inf"))
        top = ex.topk(k, dim=1)
        thr_final = tau - margin  # every key not re-scored has a bf16 score below it
        bad = full | (counts < k) | (top.values[:, -1] <= thr_final + _bound(
            part, every, keys, thr_final))
        vals, idx = top.values, cols.gather(1, top.indices)
        redo = bad.nonzero().flatten()
        for s in range(0, len(redo), 256):
            rr = redo[s:s + 256]
            with _threads(threads):
                t = part.scores(rr, keys).topk(k, dim=1)
            vals[rr], idx[rr] = t.values, t.indices
        out_v[i:i + n], out_i[i:i + n] = vals, idx
        stats["rows"] = stats.get("rows", 0) + n
        stats["exact_rows"] = stats.get("exact_rows", 0) + len(redo)
        stats["rescored_keys"] = stats.get("rescored_keys", 0) + len(cr)
    return TopK(out_v, out_i)


def _group_max(tile: Tensor) -> tuple[Tensor, int]:
    """The maximum of each strided group of columns (j, j + w, ..., j + 7w) of ``tile`` [n, m]
    as fp32 [n, w + rest] (the last m - 8w columns are their own groups), and w."""
    n, m = tile.shape
    w = m // 8
    gm = tile[:, :w * 8].view(n, 8, w).amax(1) if w else tile[:, :0]
    return (torch.cat([gm, tile[:, w * 8:]], 1) if w * 8 < m else gm).float(), w


def _survivors(tile: Tensor, gm: Tensor, w: int, thr: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(row, column, fp32 value) of every score of the contiguous ``tile`` at or above its
    row's ``thr``: the group maxima ``gm`` (``_group_max``) are compared first, then only the
    members of groups that clear it."""
    m = tile.shape[1]
    flat = tile.view(-1)
    gr, gc = (gm >= thr[:, None]).nonzero(as_tuple=True)
    tail = gc >= w  # a column of the rest, its own group
    pos = ((gr[~tail] * m + gc[~tail])[:, None] + torch.arange(8) * w).view(-1)
    vals = flat.index_select(0, pos).float()
    hit = vals >= thr[gr[~tail]].repeat_interleave(8)
    pos = torch.cat([pos[hit], gr[tail] * m + gc[tail] - w + 8 * w])
    vals = torch.cat([vals[hit], flat.index_select(0, pos[int(hit.sum()):]).float()])
    return pos // m, pos % m, vals
