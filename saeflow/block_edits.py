"""Re-running one transformer block on edited hidden states (the batched path of the
deactivation check, ``saeflow.deactivate``; Feature Flow paper sec. 5, method.md section 5).

Batching (all exact): only block L is recomputed, called directly with the keyword arguments
(rotary embeddings, mask) the model itself passes it, captured once per length. Attention is
causal, so an R_{L-1} edit at token t needs one batch row holding the clean prefix [0..t]; an
M_L or A_L edit needs only token t, with the attention output set to its clean value (plus the
edit). One edited row serves every target that reads it (all active targets at that token),
and strategies naming the same active predecessors share rows. Each layer first checks that
an unedited row reproduces the model's own R_L.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from saeflow.hooks import BlockRerun, editing, recording, run_sites
from saeflow.sites import Site


class Edit(NamedTuple):
    """Add ``delta`` [width] to the hidden state of ``site`` at one token of one text."""
    text: int
    position: int
    site: Site
    delta: Tensor


def edit_delta(acts_P: Tensor, vectors_PD: Tensor, r: float) -> Tensor:
    """``(r - 1) * sum_j a_j v_j``: rescale features with activations ``a`` by ``r``."""
    return (r - 1.0) * (acts_P.to(vectors_PD.dtype) @ vectors_PD)


def _adder(b_idx: Tensor, t_idx: Tensor, delta_ND: Tensor):
    def fn(h):
        h = h.clone()
        h[b_idx, t_idx] = h[b_idx, t_idx] + delta_ND.to(h.dtype)
        return h
    return fn


def _setter(value_BD: Tensor):
    """Replace a one-token hidden state [B, 1, width] by ``value``."""
    return lambda h: value_BD[:, None].to(h.dtype)


def _chunks(order: list[int], cost, budget: int) -> list[list[int]]:
    """Split ``order`` into runs whose ``len(run) * cost(last)`` stays within ``budget``."""
    out, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * cost(i) > budget:
            out.append(cur)
            cur = []
        cur.append(i)
    return out + [cur] if cur else out


@torch.no_grad()
def iter_edited_acts(lm, prev_hidden: Sequence[Tensor], edits: Sequence[Edit], layer: int, sae,
                     batch_tokens: int = 8192, progress: bool = False, with_pre: bool = False,
                     part: tuple[int, int] | None = None) -> Iterator[tuple[Tensor, ...]]:
    """Target-SAE activations at R_``layer`` after each edit, in batches: yields
    (edit indices [B], acts [B, F]), and the pre-activations [B, F] too with ``with_pre``.
    ``prev_hidden[text]`` is the clean input of block
    ``layer`` [T, d]; edits sit at ``layer-1/res`` or at ``layer``'s mlp / att / att_z.

    An edit of R_{L-1} at token t changes what token t attends with, so its row holds the clean
    prefix [0..t]. An edit of A_L, M_L or the o_proj input changes nothing before it in block L,
    so its row is token t alone, with the attention output (or o_proj input) set to its clean
    value plus the edit: only the rest of the block is recomputed. ``part=(i, n)``: only the
    batches i, i + n, i + 2n, ... of this plan (one unit of the Ray back end: each batch is
    computed as in the whole run)."""
    from tqdm.auto import tqdm

    for e in edits:
        if not (e.site == Site(layer - 1, "res")
                or (e.site.layer == layer and e.site.kind in ("mlp", "att", "att_z"))):
            raise ValueError(f"edit at {e.site} cannot feed {layer}/res directly; edits must be "
                             f"at {layer - 1}/res or at {layer}/mlp, att or att_z")
    run, dev, dt = BlockRerun(lm, layer), lm.device, lm.dtype
    att, att_z = Site(layer, "att"), Site(layer, "att_z")
    pre = sorted((i for i, e in enumerate(edits) if e.site.kind == "res"),
                 key=lambda i: (edits[i].position, edits[i].text))
    batches = [("res", b) for b in _chunks(pre, lambda i: edits[i].position + 1, batch_tokens)]
    for kind in ("mlp", "att", "att_z"):
        one = [i for i, e in enumerate(edits) if e.site.kind == kind]
        batches += [(kind, b) for b in _chunks(one, lambda i: 1, batch_tokens)]
    if part is not None:
        batches = batches[part[0]::part[1]]
    clean: dict[int, dict[Site, Tensor]] = {}  # text -> clean attention outputs [T, width]
    for text in sorted({edits[i].text for k, b in batches if k != "res" for i in b}):
        with recording(lm, [att, att_z]) as rec:
            run(prev_hidden[text][None])
        clean[text] = {s: v[0] for s, v in rec.items()}
    for kind, batch in tqdm(batches, desc=f"layer {layer} edits", disable=not progress,
                            leave=False):
        es = [edits[i] for i in batch]
        delta = torch.stack([e.delta for e in es]).to(dev)
        if kind == "res":
            T = es[-1].position + 1
            h = torch.zeros(len(es), T, prev_hidden[0].shape[-1], dtype=dt, device=dev)
            for b, e in enumerate(es):
                h[b, :e.position + 1] = prev_hidden[e.text][:e.position + 1]
            t_idx = torch.tensor([e.position for e in es], device=dev)
            h[torch.arange(len(es), device=dev), t_idx] += delta.to(dt)
            hooks = {}
        else:
            T, t_idx = 1, torch.zeros(len(es), dtype=torch.long, device=dev)
            h = torch.stack([prev_hidden[e.text][e.position] for e in es])[:, None]

            def at(site):
                return torch.stack([clean[e.text][site][e.position] for e in es]).to(dev)
            hooks = ({att_z: _setter(at(att_z) + delta)} if kind == "att_z" else
                     {att: _setter(at(att) + delta)} if kind == "att" else
                     {att: _setter(at(att)), Site(layer, "mlp"): _adder(
                         torch.arange(len(es), device=dev), t_idx, delta)})
        run.prepare(T)  # before the edit hooks exist: the capture pass must run clean
        with editing(lm, hooks):
            out = run(h)
        x = out[torch.arange(len(es), device=dev), t_idx]
        pre = sae.pre_acts(x)
        acts = sae.activate(pre).float().cpu()
        yield (torch.tensor(batch), acts, pre.float().cpu()) if with_pre else \
            (torch.tensor(batch), acts)


@torch.no_grad()
def block_inputs(lm, ids: Sequence[Tensor], layer: int) -> list[Tensor]:
    """The clean input of block ``layer`` for each text (its R_{layer-1}), [T, d] each."""
    out = []
    for x in ids:
        out.append(run_sites(lm, x[None], [Site(layer - 1, "res")])[Site(layer - 1, "res")][0])
    return out


def edited_target_acts(lm, ids: Sequence[Tensor], edits: Sequence[Edit], layer: int, sae,
                       batch_tokens: int = 8192) -> Tensor:
    """Target-SAE activations [n_edits, F] at R_``layer`` after each edit (batched path)."""
    prev = block_inputs(lm, ids, layer)
    out = torch.zeros(len(edits), sae.d_sae)
    for idx, acts in iter_edited_acts(lm, prev, edits, layer, sae, batch_tokens):
        out[idx] = acts
    return out


@torch.no_grad()
def naive_target_acts(lm, ids: Sequence[Tensor], edit: Edit, layer: int, sae) -> Tensor:
    """Reference: one full forward pass of the whole text with the edit hooked in, [F]."""
    target = Site(layer, "res")
    fn = _adder(torch.tensor([0]), torch.tensor([edit.position]), edit.delta[None])
    with editing(lm, {edit.site: fn}), recording(lm, [target]) as rec:
        lm.model(input_ids=ids[edit.text][None].to(lm.device), use_cache=False)
    return sae.encode(rec[target][0, edit.position]).float().cpu()
