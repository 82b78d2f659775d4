"""Which tokens an SAE may be trained on, scored on or applied to: one rule for every module.

The rule (``usable_tokens``):
  1. Position 0, the first token of a sequence, is never usable. Many models park a huge norm
     there (SmolLM2: ~24,000-27,000 against 50-700 elsewhere); SAEs are not trained on it and
     return meaningless activations there (290-760 instead of 4-6 on SmolLM2), so encoding or
     editing it wrecks that token.
  2. A token whose norm exceeds ``max_norm`` is not usable either. ``max_norm`` defaults to
     ``OUTLIER_FACTOR`` (10) times the median norm of the position >= 1 tokens of the same
     hidden state (``norm_limit``); SmolLM2's document separators reach ~100x the typical norm.
Callers differ only in the sample ``max_norm`` is measured on: training measures it once on its
first batch and keeps it, quality evaluation measures each batch, steering measures each forward
pass that has enough tokens (the prompt) and keeps that limit for the one-token steps of cached
generation (``LimitMemory``).

"Position" means the token's position in its own sequence, not its index in a padded batch. For
a plain forward pass the two agree. During generation transformers passes ``position_ids``
(left padding shifts them), so ``tracking_positions(model)`` records the positions of the
current forward pass for hooks inside it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from saeflow.configs import OUTLIER_FACTOR

__all__ = ["OUTLIER_FACTOR", "LimitMemory", "PositionTracker", "norm_limit", "tracking_positions",
           "usable_tokens"]

REFERENCE_TOKENS = 8  # fewer usable tokens than this: too few for a median (LimitMemory)


def _positions(h: Tensor, positions: Tensor | None) -> Tensor:
    """Positions [..., T] of the tokens of ``h`` [..., T, D] (their index when not given)."""
    shape = h.shape[:-1]
    if positions is None:
        return torch.arange(shape[-1], device=h.device).expand(shape)
    pos = torch.as_tensor(positions, device=h.device)
    try:
        return pos.expand(shape)
    except RuntimeError:
        raise ValueError(f"positions of shape {tuple(pos.shape)} do not fit hidden states of "
                         f"shape {tuple(h.shape)} (expected [..., T] for [..., T, D])") from None


def norm_limit(h: Tensor, factor: float = OUTLIER_FACTOR, positions: Tensor | None = None
               ) -> float:
    """``factor`` x the median norm of the tokens of ``h`` [..., T, D] not at position 0
    (``inf`` when there are none)."""
    if not factor > 0:
        raise ValueError(f"the outlier factor must be positive, got {factor}")
    norms = h.detach().float().norm(dim=-1)
    rest = norms[_positions(h, positions) != 0]
    return float("inf") if rest.numel() == 0 else float(factor * rest.median())


def usable_tokens(h: Tensor, max_norm: float | None = None, factor: float = OUTLIER_FACTOR,
                  positions: Tensor | None = None) -> Tensor:
    """Bool mask [..., T] of the usable tokens of ``h`` [..., T, D] (module docstring):
    position >= 1 and norm <= ``max_norm`` (default ``norm_limit(h, factor, positions)``)."""
    if h.dim() < 2:
        raise ValueError(f"hidden states must be [..., tokens, width], got shape {tuple(h.shape)}")
    pos = _positions(h, positions)
    limit = norm_limit(h, factor, positions) if max_norm is None else float(max_norm)
    return (pos != 0) & (h.detach().float().norm(dim=-1) <= limit)


class LimitMemory:
    """``max_norm`` for a stream of forward passes at one site: measured on each pass with at
    least ``REFERENCE_TOKENS`` usable-position tokens and kept for the smaller ones (the
    one-token steps of cached generation), which measure their own only before any large one."""

    def __init__(self, factor: float = OUTLIER_FACTOR):
        self.factor = factor
        self.limit: float | None = None

    def __call__(self, h: Tensor, positions: Tensor | None = None) -> float:
        n = int((_positions(h, positions) != 0).sum())
        if n >= REFERENCE_TOKENS or self.limit is None:
            limit = norm_limit(h, self.factor, positions)
            if n >= REFERENCE_TOKENS:
                self.limit = limit
            return limit
        return self.limit


class PositionTracker:
    """The positions [B, T] of the tokens of the model's current forward pass (None outside)."""

    def __init__(self):
        self.positions: Tensor | None = None

    def for_hidden(self, h: Tensor) -> Tensor | None:
        """The positions of ``h`` [B, T, D] when they fit its shape, else None (index =
        position)."""
        p = self.positions
        if p is None or h.dim() != 3 or p.shape[-1] != h.shape[1] or p.shape[0] not in (
                1, h.shape[0]):
            return None
        return p.to(h.device)


@contextmanager
def tracking_positions(model) -> Iterator[PositionTracker]:
    """Record each forward pass's token positions from the keyword arguments transformers
    passes the model (``position_ids``, else ``cache_position``, else the cache length plus the
    index). Removes its hook when the block ends."""
    tracker = PositionTracker()

    def pre(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        T = ids.shape[-1] if ids is not None else (emb.shape[1] if emb is not None else None)
        pos = kwargs.get("position_ids")
        if pos is None and kwargs.get("cache_position") is not None:
            pos = kwargs["cache_position"]
        if pos is None and T is not None:
            past = kwargs.get("past_key_values")
            start = int(past.get_seq_length()) if hasattr(past, "get_seq_length") else 0
            pos = torch.arange(start, start + T)
        if pos is not None:
            pos = torch.as_tensor(pos)
            pos = pos[None] if pos.dim() == 1 else pos
        tracker.positions = pos
        return None

    handle = model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield tracker
    finally:
        handle.remove()
        tracker.positions = None
