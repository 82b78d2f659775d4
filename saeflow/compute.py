"""Two small pieces of computation several modules share.

Padded batches: ``pad_batch`` turns token-id lists of different lengths into ``[B, W]`` ids
and an attention mask, padded on the right (scoring, deactivation, themes) or on the left
(generation, so every row's next token comes last); ``pad_id`` is the tokenizer's pad token,
else its EOS token, else 0.

Whether bf16 matmuls pay on this machine: one measurement and one threshold for every module
that may use them (the TopK trainer's encoder, the blocked cosine top-k of matching and the
atlas), and the model dtype ``auto`` resolves to (``model_dtype``: training and the demo).

``bf16_speedup(d, n)`` times a ``[1024, d] @ [d, n]`` product in fp32 and in bf16 (best of
three each, once per shape and process); ``bf16_is_fast`` says whether it reaches
``BF16_THRESHOLD`` = 1.5. One threshold, the stricter of the two the modules used (training
1.5x, matching 1.3x): CPUs with native bf16 (AMX, AVX512-BF16) run these products 2x or more
faster and CPUs without it run them slower than fp32, so 1.5 separates the two with room for
the noise of three timings on a loaded machine, and a reading in between (no clear gain) keeps
the exact fp32 path. Matching results are exact fp32 either way; training's bf16
pre-activations cost about 0.4% in the encoder, which a marginal speed-up does not pay for.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor

BF16_THRESHOLD = 1.5


@lru_cache(maxsize=None)
def bf16_speedup(d: int = 1024, n: int = 1024) -> float:
    """fp32 time / bf16 time of a ``[1024, d] @ [d, n]`` matmul here (best of three each)."""
    a, b = torch.randn(1024, d), torch.randn(n, d)

    def best(x, y) -> float:
        torch.mm(x, y.T)  # warm-up
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            torch.mm(x, y.T)
            times.append(time.perf_counter() - t0)
        return min(times)
    return best(a, b) / max(best(a.bfloat16(), b.bfloat16()), 1e-9)


def bf16_is_fast(d: int = 1024, n: int = 1024) -> bool:
    """True when bf16 products of this shape run ``BF16_THRESHOLD`` times faster than fp32."""
    return bf16_speedup(d, n) >= BF16_THRESHOLD


def model_dtype(dtype: str, device: str | None) -> str:
    """``dtype``, with ``auto`` resolved: bfloat16 on a CUDA GPU, and on the CPU where bf16
    products run at least ``BF16_THRESHOLD`` times faster than fp32 (AVX512-BF16, AMX);
    float32 elsewhere. Without native bf16 (AVX2 alone) a bf16 model runs several times slower
    than in fp32."""
    if dtype != "auto":
        return dtype
    from saeflow.models import resolve_device
    kind = resolve_device(device).type
    if kind != "cpu":
        return "bfloat16" if kind == "cuda" else "float32"
    return "bfloat16" if bf16_is_fast() else "float32"


def pad_id(tokenizer) -> int:
    """The tokenizer's pad token id, else its EOS token id, else 0."""
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if v is not None:
            return int(v)
    return 0


def pad_batch(seqs: Sequence[Sequence[int]], pad: int = 0, left: bool = False,
              device=None) -> tuple[Tensor, Tensor]:
    """``(ids [B, W], mask [B, W])`` of token-id lists padded with ``pad`` to the longest
    (``W`` >= 1), on the left with ``left``; ``mask`` is 1 on real tokens."""
    width = max(1, max((len(s) for s in seqs), default=0))
    rows, masks = [], []
    for s in seqs:
        fill, real = [pad] * (width - len(s)), list(s)
        rows.append(fill + real if left else real + fill)
        ones, zeros = [1] * len(s), [0] * (width - len(s))
        masks.append(zeros + ones if left else ones + zeros)
    return (torch.tensor(rows, dtype=torch.long, device=device),
            torch.tensor(masks, dtype=torch.long, device=device))
