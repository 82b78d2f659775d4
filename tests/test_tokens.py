"""The one usable-token rule: position 0 and outlier norms are excluded, positions are honoured,
the limit is remembered for small passes, and positions are tracked through generation."""

from __future__ import annotations

import math

import pytest
import torch

from saeflow.tokens import (OUTLIER_FACTOR, LimitMemory, norm_limit, tracking_positions,
                            usable_tokens)
from tiny import tiny_llama


def states(norms):
    """Hidden states [B, T, 4] whose token norms are ``norms`` [B][T]."""
    n = torch.tensor(norms, dtype=torch.float32)
    return n[..., None] * torch.tensor([0.5, 0.5, 0.5, 0.5])


def test_rule_drops_position_0_and_outliers():
    h = states([[24000.0, 3.0, 4.0, 5.0, 300.0, 4.0], [9000.0, 4.0, 4.0, 39.0, 41.0, 4.0]])
    assert norm_limit(h) == pytest.approx(OUTLIER_FACTOR * 4.0)  # median of positions >= 1
    keep = usable_tokens(h)
    assert keep.tolist() == [[False, True, True, True, False, True],
                             [False, True, True, True, False, True]]
    assert usable_tokens(h, max_norm=1000.0)[0].tolist() == [False] + [True] * 5
    assert usable_tokens(h, factor=100.0)[0, 4]  # 300 < 100 x 4
    # 2-d input [T, D]: one sequence
    assert usable_tokens(h[0]).tolist() == keep[0].tolist()


def test_positions_replace_the_index():
    h = states([[1.0, 1.0, 24000.0, 3.0], [24000.0, 3.0, 4.0, 5.0]])
    pos = torch.tensor([[0, 0, 0, 1], [0, 1, 2, 3]])  # row 0 is left-padded twice
    keep = usable_tokens(h, positions=pos)
    assert keep.tolist() == [[False, False, False, True], [False, True, True, True]]
    decode = states([[4.0], [5.0]])  # one cached step: positions 7 and 9, none is first
    assert usable_tokens(decode, positions=torch.tensor([[7], [9]])).all()
    with pytest.raises(ValueError, match="do not fit"):
        usable_tokens(h, positions=torch.tensor([0, 1, 2]))
    assert math.isinf(norm_limit(states([[5.0]])))  # only position 0: no limit
    with pytest.raises(ValueError, match="positive"):
        norm_limit(h, factor=0.0)


def test_limit_memory_keeps_the_prompt_limit_for_small_steps():
    mem = LimitMemory()
    small = states([[4.0, 500.0]])
    assert mem(small) == pytest.approx(5000.0)  # nothing remembered yet: its own median
    prompt = states([[24000.0] + [4.0] * 10])
    assert mem(prompt) == pytest.approx(40.0)
    step = states([[500.0]])
    lim = mem(step, torch.tensor([[11]]))
    assert lim == pytest.approx(40.0) and not usable_tokens(step, lim, positions=torch.tensor(
        [[11]])).any()


def test_tracking_positions_in_generation():
    model = tiny_llama(0, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, vocab_size=50,
                       pad_token_id=0, eos_token_id=None, bos_token_id=None)
    seen = []
    inner = model.model.layers[0]
    with tracking_positions(model) as tr:
        h = inner.register_forward_hook(lambda m, a, out: seen.append(tr.positions.clone()))
        try:
            model(input_ids=torch.tensor([[5, 6, 7]]))
            model.generate(input_ids=torch.tensor([[0, 0, 5, 6], [5, 6, 7, 8]]),
                           attention_mask=torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]),
                           max_new_tokens=2, do_sample=False, pad_token_id=0)
        finally:
            h.remove()
    assert seen[0].tolist() == [[0, 1, 2]]
    assert seen[1][0, 2:].tolist() == [0, 1] and seen[1][1].tolist() == [0, 1, 2, 3]
    assert seen[2].tolist() == [[2], [4]]  # the first cached step
    assert tr.positions is None and not model._forward_pre_hooks
