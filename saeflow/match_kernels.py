"""Shortlists and re-scoring for the blocked cosine top-k of ``saeflow.match``, compiled or torch.

``match._pair_pass`` computes ``a @ b.T`` tile by tile ("Analyze Feature Flow" sec. 3: top-k
decoder cosines, no data); everything after each product is here. In plain torch a tile costs
a ``topk`` over its rows, a transposed copy and a second ``topk`` for its columns, then a
``cat`` + ``topk`` merge of each running shortlist, and the fp32 re-scoring gathers every
candidate key row into a new buffer before a batched product: on a 16k x 16k x 2304 pair that
was about as much time as the bf16 products. The compiled path (numba) gives the same
shortlist scores without those passes:

  ``Shortlists``: every row and every column owns a running shortlist of its ``S`` best scores
      so far (unordered) whose minimum is its threshold. Scores are compared as integer order
      keys of the tile's own bits (bf16 or fp32, magnitude bits flipped when negative), so the
      tile is read in place and never converted. Rows: the maxima of 16 strided groups of
      entries are one vectorised pass; only groups whose maximum beats the threshold are read
      again. Columns: the maxima of 16-row groups are a vectorised pass along the rows (no
      transposed copy); only (group, column) cells that beat the column's threshold are read
      down the column. A fresh shortlist's threshold starts just below the ``S``-th largest
      group maximum (``S`` groups hold an entry that large), so the first tile does not churn.
      A shortlist holds exactly the top-``S`` multiset of the scores seen, like the torch merge
      (ties at the ``S``-th value may keep other indices). Scores with a bias (the kNN step of
      permutation matching) take the torch path;
  ``rescore``: fp32 dot products of query rows with the candidate key rows they name, read in
      place (no gathered copy).

Both run on ``torch.get_num_threads()`` Python threads (the kernels release the GIL): a tile's
rows split in parts and its columns split in parts (disjoint shortlists, no locks), re-scoring
by chunks of query rows. ``kernels="auto"`` is numba when it is installed, ``"torch"`` the
plain path (kept as the baseline the matching benchmark times in the same run), ``"numba"``
requires numba.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

try:
    import numba
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = None

_CHUNK = 64  # entries per vectorised skip test along a row
_GROUP = 16  # rows per group maximum of the column scan


def available() -> bool:
    return numba is not None


def resolve(kernels: str = "auto") -> str:
    """``"numba"`` or ``"torch"`` for a ``kernels`` setting ("auto", "numba", "torch")."""
    if kernels not in ("auto", "numba", "torch"):
        raise ValueError(f"kernels must be 'auto', 'numba' or 'torch', got {kernels!r}")
    if kernels == "numba" and numba is None:
        raise ValueError("kernels='numba' needs numba installed (pip install numba)")
    return "numba" if kernels == "auto" and numba is not None else (
        "torch" if kernels == "auto" else kernels)


if numba is not None:
    _jit = numba.njit(nogil=True, cache=True)  # integer keys: exact comparisons
    _jit_fast = numba.njit(nogil=True, cache=True, fastmath=True)  # fp32 dot products

    @_jit
    def _insert(vals, idx, cnt, thr, amin, i, v, j):
        """Put score ``v`` of key ``j`` into shortlist ``i`` (filling it, else replacing its
        minimum, which the caller checked ``v`` beats) and refresh its threshold."""
        S = vals.shape[1]
        n = cnt[i]
        if n < S:
            vals[i, n], idx[i, n] = v, j
            cnt[i] = n + 1
            if n + 1 < S:
                return
        else:
            p = amin[i]
            vals[i, p], idx[i, p] = v, j
        m, p = vals[i, 0], 0
        for s in range(1, S):
            if vals[i, s] < m:
                m, p = vals[i, s], s
        thr[i], amin[i] = m, p

    @_jit
    def _kth(v, n, S, buf):
        """The ``S``-th largest of ``v[:n]`` (``S <= n``), by insertion into a sorted ``buf``."""
        for t in range(S):
            buf[t] = v[t]
        for t in range(1, S):  # insertion sort of the first S, descending
            x, u = buf[t], t
            while u > 0 and buf[u - 1] < x:
                buf[u] = buf[u - 1]
                u -= 1
            buf[u] = x
        for t in range(S, n):
            x = v[t]
            if x > buf[S - 1]:
                u = S - 1
                while u > 0 and buf[u - 1] < x:
                    buf[u] = buf[u - 1]
                    u -= 1
                buf[u] = x
        return buf[S - 1]

    @_jit
    def _rows_keys(tile, top, mask, r0, r1, row_base, col_base, keys, idx, cnt, thr, amin,
                   gm, buf):
        """Tile rows ``r0:r1`` (float bits, no bias) into the row shortlists, compared as
        order keys. A row's ``n`` entries form ``ng = ceil(n / 16)`` strided groups (entries
        ``j, j + ng, ...``); the group maxima are a vectorised pass, and only groups whose
        maximum beats the row's threshold are read again. A fresh row's threshold starts just
        below the ``S``-th largest group maximum (``S`` groups hold an entry that large)."""
        n, S = tile.shape[1], keys.shape[1]
        ng = (n + 15) // 16
        for r in range(r0, r1):
            row, i = tile[r], row_base + r
            for j in range(ng):
                x = row[j]
                gm[j] = x ^ ((x >> top) & mask)
            for t in range(1, 16):
                seg = row[t * ng:min(n, (t + 1) * ng)]
                for j in range(seg.shape[0]):
                    x = seg[j]
                    gm[j] = max(gm[j], x ^ ((x >> top) & mask))
            if cnt[i] == 0 and ng >= S:
                thr[i] = _kth(gm, ng, S, buf) - 1
            for j in range(ng):
                if gm[j] > thr[i]:
                    for c in range(j, n, ng):
                        x = row[c]
                        k = x ^ ((x >> top) & mask)
                        if k > thr[i]:
                            _insert(keys, idx, cnt, thr, amin, i, k, col_base + c)

    @_jit
    def _group_max(tile, top, mask, g, c0, c1, out):
        """``out[s]``: the largest key of column ``c0 + s`` over the rows of group ``g``."""
        m = tile.shape[0]
        row = tile[g * _GROUP, c0:c1]
        for s in range(c1 - c0):
            x = row[s]
            out[s] = x ^ ((x >> top) & mask)
        for r in range(g * _GROUP + 1, min(g * _GROUP + _GROUP, m)):
            row = tile[r, c0:c1]
            for s in range(c1 - c0):
                x = row[s]
                out[s] = max(out[s], x ^ ((x >> top) & mask))

    @_jit
    def _scan_group(tile, top, mask, g, c0, gr, th, row_base, col_base, keys, idx, cnt, thr,
                    amin):
        """Read down the columns whose group maximum ``gr`` beats their threshold ``th``."""
        m = tile.shape[0]
        for s in range(gr.shape[0]):
            if gr[s] > th[s]:
                for r in range(g * _GROUP, min(g * _GROUP + _GROUP, m)):
                    x = tile[r, c0 + s]
                    k = x ^ ((x >> top) & mask)
                    if k > th[s]:
                        _insert(keys, idx, cnt, thr, amin, col_base + c0 + s, k, row_base + r)

    @_jit
    def _cols_keys(tile, top, mask, c0, c1, row_base, col_base, keys, idx, cnt, thr, amin,
                   G):
        """Tile columns ``c0:c1`` (float bits, no bias) into the column shortlists: the maxima
        of 16-row groups are a vectorised pass along the rows, and only the groups whose
        maximum beats the column's threshold are read down the column, right after their
        maxima (the rows are still in cache). Fresh columns (the first row block) first take
        every group's maximum and start just below the ``S``-th largest of their own."""
        m, w, S = tile.shape[0], c1 - c0, keys.shape[1]
        ng = (m + _GROUP - 1) // _GROUP
        th = thr[col_base + c0:col_base + c1]
        if ng >= S and cnt[col_base + c0] == 0:
            col, buf = np.empty(ng, G.dtype), np.empty(S, G.dtype)
            for g in range(ng):
                _group_max(tile, top, mask, g, c0, c1, G[g])
            for s in range(w):
                if cnt[col_base + c0 + s] == 0:
                    for g in range(ng):
                        col[g] = G[g, s]
                    th[s] = _kth(col, ng, S, buf) - 1
            for g in range(ng):
                _scan_group(tile, top, mask, g, c0, G[g], th, row_base, col_base, keys, idx,
                            cnt, thr, amin)
            return
        for g in range(ng):
            _group_max(tile, top, mask, g, c0, c1, G[0])
            _scan_group(tile, top, mask, g, c0, G[0], th, row_base, col_base, keys, idx, cnt,
                        thr, amin)

    @_jit_fast
    def _dots(q, k, rows, cols, a0, a1, out):
        """``out[a, j] = q[rows[a]] . k[cols[a, j]]`` in fp32 for ``a0 <= a < a1``."""
        for a in range(a0, a1):
            qa = q[rows[a]]
            for j in range(cols.shape[1]):
                kb = k[cols[a, j]]
                s = np.float32(0.0)
                for d in range(qa.shape[0]):
                    s += qa[d] * kb[d]
                out[a, j] = s


@lru_cache(maxsize=4)
def _pool(n: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(n, thread_name_prefix="saeflow-match")


def _run(tasks: list) -> None:
    """Run zero-argument callables on the thread pool (in place when one thread)."""
    n = max(1, torch.get_num_threads())
    if n == 1 or len(tasks) == 1:
        for t in tasks:
            t()
        return
    for f in [_pool(n).submit(t) for t in tasks]:
        f.result()


_KEYS = {torch.bfloat16: (torch.int16, 15, 0x7FFF), torch.float32: (torch.int32, 31, 0x7FFFFFFF)}


def _bits(tile: Tensor) -> np.ndarray:
    """A tile's float bits as an integer array."""
    if tile.dtype not in _KEYS:
        raise TypeError(f"tiles must be bf16 or fp32, got {tile.dtype}")
    return tile.view(_KEYS[tile.dtype][0]).numpy()


class _Side:
    """Running shortlists of ``n`` rows (or columns), ``S`` entries each, on the compiled path:
    order keys of the tile's float type (bits with the magnitude flipped when negative)."""

    def __init__(self, n: int, S: int, dtype: torch.dtype):
        self.dtype = dtype
        kt = _KEYS[dtype][0]
        self.vals = torch.full((n, S), torch.iinfo(kt).min, dtype=kt)
        self.thr = np.full(n, torch.iinfo(kt).min, self.vals.numpy().dtype)
        self.idx = torch.zeros(n, S, dtype=torch.long)
        self.cnt = np.zeros(n, np.int32)
        self.amin = np.zeros(n, np.int32)

    def state(self):
        return self.vals.numpy(), self.idx.numpy(), self.cnt, self.thr, self.amin

    def result(self) -> tuple[Tensor, Tensor]:
        _, top, mask = _KEYS[self.dtype]  # keys back to float bits: the map is an involution
        v = (self.vals ^ ((self.vals >> top) & mask)).view(self.dtype).float()
        v, order = v.sort(dim=1, descending=True, stable=True)
        return v, self.idx.gather(1, order)


class Shortlists:
    """The best ``keep_rows`` scores of every row of a @ b.T (plus the keys' bias) and, with
    ``keep_cols``, of every column (plus the queries' bias), fed one tile at a time by
    ``add(tile, i, j)`` (tile = rows ``i:`` of a against rows ``j:`` of b); ``rows()`` and
    ``cols()`` give ``(values [n, S] best first, indices)``. ``kernels``: module docstring."""

    def __init__(self, n_rows: int, n_cols: int, keep_rows: int, keep_cols: int | None,
                 bias_rows: Tensor | None, bias_cols: Tensor | None, block: int,
                 kernels: str = "auto"):
        # scores with a bias (the kNN of permutation matching) take the torch path
        self.kind = "torch" if bias_rows is not None or bias_cols is not None else resolve(
            kernels)
        self.n_rows, self.n_cols = n_rows, n_cols
        self.keep_rows, self.keep_cols = keep_rows, keep_cols
        self.bias_rows, self.bias_cols = bias_rows, bias_cols  # added to row / column scores
        self._block = block
        self._r: _Side | None = None
        self._c: _Side | None = None
        if self.kind == "torch":
            self._rv: list[Tensor] = []
            self._ri: list[Tensor] = []
            n_col_blocks = (n_cols + block - 1) // block
            self._cv = [torch.empty(0, 0)] * n_col_blocks
            self._ci = [torch.empty(0, 0, dtype=torch.long)] * n_col_blocks
            self._tr: Tensor | None = None

    def add(self, tile: Tensor, i: int, j: int) -> None:
        if self.kind == "numba":
            self._add_compiled(tile, i, j)
        else:
            self._add_torch(tile, i, j)

    def _add_compiled(self, tile: Tensor, i: int, j: int) -> None:
        bits = _bits(tile)
        if self._r is None:
            self._r = _Side(self.n_rows, self.keep_rows, tile.dtype)
            if self.keep_cols is not None:
                self._c = _Side(self.n_cols, self.keep_cols, tile.dtype)
        elif self._r.dtype != tile.dtype:
            raise TypeError(f"tiles changed type from {self._r.dtype} to {tile.dtype}")
        m, n = bits.shape
        parts = max(1, torch.get_num_threads())
        _, top, mask = _KEYS[tile.dtype]
        top, mask = bits.dtype.type(top), bits.dtype.type(mask)
        r_side, c_side, tasks = self._r, self._c, []
        step = -(-m // parts)
        for r0 in range(0, m, step):
            tasks.append(lambda r0=r0: _rows_keys(
                bits, top, mask, r0, min(m, r0 + step), i, j, *r_side.state(),
                np.empty(-(-n // 16), bits.dtype), np.empty(self.keep_rows, bits.dtype)))
        if c_side is not None:
            cstep = -(-n // parts)
            for c0 in range(0, n, cstep):
                c1 = min(n, c0 + cstep)
                tasks.append(lambda c0=c0, c1=c1: _cols_keys(
                    bits, top, mask, c0, c1, i, j, *c_side.state(),
                    np.empty((-(-m // _GROUP), c1 - c0), bits.dtype)))
        _run(tasks)

    def _add_torch(self, tile: Tensor, i: int, j: int) -> None:
        """The plain path: ``topk`` of the tile's rows, and of its columns on a transposed
        copy, each merged into the running shortlists by ``cat`` + ``topk``."""
        m, n = tile.shape
        if j == 0:
            self._rv.append(torch.empty(0, 0))
            self._ri.append(torch.empty(0, 0, dtype=torch.long))
        scored = tile if self.bias_rows is None else tile.float() + self.bias_rows[j:j + n]
        top = scored.topk(min(self.keep_rows, n), dim=1)
        self._rv[-1], self._ri[-1] = _merge(self._rv[-1], self._ri[-1], top.values.float(),
                                            top.indices + j, self.keep_rows)
        if self.keep_cols is None:
            return
        if self._tr is None or self._tr.numel() < tile.numel() or self._tr.dtype != tile.dtype:
            self._tr = torch.empty(tile.numel(), dtype=tile.dtype)
        tt = self._tr[:tile.numel()].view(n, m).copy_(tile.T)
        scored = tt if self.bias_cols is None else tt.float() + self.bias_cols[i:i + m]
        top = scored.topk(min(self.keep_cols, m), dim=1)
        jb = j // self._block
        self._cv[jb], self._ci[jb] = _merge(self._cv[jb], self._ci[jb], top.values.float(),
                                            top.indices + i, self.keep_cols)

    def rows(self) -> tuple[Tensor, Tensor]:
        if self.kind == "numba":
            if self._r is None:
                raise ValueError("no tile was added")
            return self._r.result()
        return torch.cat(self._rv), torch.cat(self._ri)

    def cols(self) -> tuple[Tensor, Tensor]:
        if self.keep_cols is None:
            raise ValueError("these shortlists were made without columns (keep_cols=None)")
        if self.kind == "numba":
            if self._c is None:
                raise ValueError("no tile was added")
            return self._c.result()
        self._tr = None
        return torch.cat(self._cv), torch.cat(self._ci)


def _merge(vals: Tensor, idx: Tensor, new_vals: Tensor, new_idx: Tensor, keep: int):
    if vals.shape[1] == 0:
        return new_vals, new_idx
    v, i = torch.cat([vals, new_vals], 1), torch.cat([idx, new_idx], 1)
    top = v.topk(min(keep, v.shape[1]), dim=1)
    return top.values, i.gather(1, top.indices)


def rescore(q_QD: Tensor, k_KD: Tensor, cols_NC: Tensor, rows_N: Tensor | None = None,
            kernels: str = "auto") -> Tensor:
    """Exact fp32 ``q[rows[a]] . k[cols[a, j]]`` as ``[N, C]`` (``rows`` None: query row a);
    ``q`` and ``k`` are contiguous fp32."""
    n, c = cols_NC.shape
    out = torch.empty(n, c)
    if n == 0 or c == 0:
        return out
    if resolve(kernels) == "torch":
        return _gather_dots(q_QD if rows_N is None else q_QD[rows_N], k_KD, cols_NC, out)
    rows = (torch.arange(n) if rows_N is None else rows_N).long().contiguous().numpy()
    q, k, cols, o = q_QD.numpy(), k_KD.numpy(), cols_NC.long().contiguous().numpy(), out.numpy()
    step = max(64, -(-n // max(1, torch.get_num_threads())))
    _run([lambda a0=a0: _dots(q, k, rows, cols, a0, min(n, a0 + step), o)
          for a0 in range(0, n, step)])
    return out


def _gather_dots(q: Tensor, k: Tensor, cols: Tensor, out: Tensor) -> Tensor:
    """The plain path: gather the candidate key rows into a buffer, one batched product."""
    n, c = cols.shape
    step = max(1, 16384 // max(c, 1))
    buf = torch.empty(min(n, step) * c, q.shape[1])
    for s in range(0, n, step):
        cc = cols[s:s + step]
        g = torch.index_select(k, 0, cc.flatten(), out=buf[:cc.numel()])
        torch.bmm(g.view(len(cc), c, -1), q[s:s + step, :, None], out=out[s:s + step, :, None])
    return out
