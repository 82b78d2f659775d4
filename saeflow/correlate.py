"""Top-1 Pearson correlation of SAE activations: the data-based baseline of the deactivation
check (Feature Flow paper, sec. 5; method.md section 5: "top-1 Pearson correlation of
activations").

For each target feature, the source feature whose activations correlate best with it over a
sample of tokens. Choices:
  - ``pearson_top1`` works on two dense activation matrices held in memory (a few thousand
    tokens at most).
  - ``StreamingPearson`` accumulates the sufficient statistics (n, sums, sums of squares and
    the cross products) over token chunks, so the correlation can run on >= 100k tokens with
    memory that does not grow with the sample: only the targets' columns are kept ([P, F] cross
    products for P targets and F source features). SAE activations are sparse (TopK k = 32 of
    thousands), so the cross products are sparse-times-dense products; sums are kept in float64.
  - A constant column (a feature that never fires on the sample) has no correlation: its
    top-1 is -1 with value NaN; a constant source column is never picked.
  - POWER_TOKENS (100,000) is the sample size below which the baseline is called underpowered:
    a feature firing on ~1.4% of tokens fires ~57 times in 4,096 tokens, too few for a
    correlation to separate its true predecessor from chance co-firing.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from saeflow.configs import POWER_TOKENS  # noqa: F401  (defined there)


def pearson_top1(x_NT: Tensor, y_NF: Tensor, block: int = 1024) -> tuple[Tensor, Tensor]:
    """For each column of ``x`` the column of ``y`` with the highest Pearson correlation over
    the N rows: (values [T], indices [T]); index -1 where x's column is constant."""
    x = x_NT.float() - x_NT.float().mean(0)
    y = y_NF.float() - y_NF.float().mean(0)
    xs, ys = x.norm(dim=0), y.norm(dim=0)
    yn = torch.where(ys > 0, 1.0 / ys.clamp_min(1e-30), torch.zeros_like(ys))
    vals, idx = [], []
    for i in range(0, x.shape[1], block):
        C = (x[:, i:i + block].T @ y) * yn  # [b, F], still to divide by |x|
        C = C / xs[i:i + block, None].clamp_min(1e-30)
        C[:, ys == 0] = -math.inf
        v, j = C.max(dim=1)
        vals.append(v.float())
        idx.append(j)
    v, j = torch.cat(vals), torch.cat(idx)
    dead = (xs == 0) | (ys > 0).sum().eq(0)
    return torch.where(dead, torch.nan, v), torch.where(dead, -1, j)


class StreamingPearson:
    """Top-1 Pearson correlation of ``n_x`` target columns against ``n_y`` source columns,
    accumulated chunk by chunk (see the module docstring)."""

    def __init__(self, n_x: int, n_y: int):
        self.n = 0
        self.sx = torch.zeros(n_x, dtype=torch.float64)
        self.sxx = torch.zeros(n_x, dtype=torch.float64)
        self.fires = torch.zeros(n_x, dtype=torch.long)  # tokens where each target is > 0
        self.sy = torch.zeros(n_y, dtype=torch.float64)
        self.syy = torch.zeros(n_y, dtype=torch.float64)
        self.sxy = torch.zeros(n_x, n_y, dtype=torch.float64)

    def update(self, x_NT: Tensor, y_NF: Tensor) -> None:
        """Add N tokens: target activations ``x`` [N, n_x], source activations ``y`` [N, n_y]."""
        if x_NT.shape[0] != y_NF.shape[0] or x_NT.shape[1] != self.sx.shape[0] \
                or y_NF.shape[1] != self.sy.shape[0]:
            raise ValueError(f"StreamingPearson.update: shapes {tuple(x_NT.shape)} and "
                             f"{tuple(y_NF.shape)} do not fit [N, {self.sx.shape[0]}] and "
                             f"[N, {self.sy.shape[0]}]")
        x, y = x_NT.float(), y_NF.float()
        self.n += x.shape[0]
        self.sx += x.sum(0).double()
        self.sxx += (x * x).sum(0).double()
        self.fires += (x > 0).sum(0)
        self.sy += y.sum(0).double()
        self.syy += (y * y).sum(0).double()
        xt = x.T.contiguous()
        if (xt != 0).float().mean() < 0.1:  # sparse activations: sparse x dense
            self.sxy += torch.sparse.mm(xt.to_sparse(), y).double()
        else:
            self.sxy += (xt @ y).double()

    def top1(self) -> tuple[Tensor, Tensor]:
        """(values [n_x], indices [n_x]) of the best-correlated source column; -1 / NaN for a
        target that is constant on the sample."""
        if self.n < 2:
            raise ValueError("StreamingPearson needs at least 2 tokens")
        n = float(self.n)
        mx, my = self.sx / n, self.sy / n
        vx = (self.sxx / n - mx * mx).clamp_min(0)
        vy = (self.syy / n - my * my).clamp_min(0)
        cov = self.sxy / n - mx[:, None] * my[None, :]
        good_y = vy > 1e-24
        C = cov / (vx.sqrt()[:, None] * vy.sqrt()[None, :]).clamp_min(1e-300)
        C[:, ~good_y] = -math.inf
        v, j = C.max(dim=1)
        dead = (vx <= 1e-24) | ~good_y.any()
        return torch.where(dead, torch.nan, v.float()), torch.where(dead, -1, j)
