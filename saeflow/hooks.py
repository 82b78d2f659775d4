"""Read and edit hidden states at sites, with plain PyTorch hooks behind context managers.

Every context manager here removes its hooks in ``finally``, so the model is restored also
when the forward pass or generation raises. Hidden states are ``[batch, tokens, width]``.

- ``recording(lm, sites)``: a dict that fills with each site's hidden state on every forward.
- ``editing(lm, {site: fn})``: ``fn(h) -> h`` replaces the hidden state at the site.
- ``run_sites(lm, ids, sites)``: one forward pass that stops after the last layer it needs.
- ``SiteTaps(lm, sites)``: record and patch per thread, for several threads running forward
  passes of one model at once (training, quality); ``loss_from`` reruns only the blocks from
  a patched layer on, from the clean pass's input to that block (quality).
- ``BlockRerun(lm, layer)``: call one decoder block directly, with the extra arguments the model
  itself passes it (deactivation recomputes block L only).
The viewer streams generated tokens with transformers' streamer and stopping criteria, so it
needs no hook.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saeflow.models import LM
from saeflow.sites import Site

EditFn = Callable[[Tensor], Tensor | None]  # a new hidden state, or None: unchanged


def _main(out):
    """Decoder layers return tensors in transformers 5.x, attention modules tuples."""
    return out[0] if isinstance(out, tuple) else out


def _with_main(out, new: Tensor):
    return (new, *out[1:]) if isinstance(out, tuple) else new


@contextmanager
def _hooks(lm: LM, site_fns: Iterable[tuple[Site, Callable[[Tensor], Tensor | None]]]):
    """Register ``fn(h)`` at each site; a non-None return replaces the hidden state."""
    handles = []
    try:
        for site, fn in site_fns:
            module, where = lm.site_module(site)
            if where == "output":
                def hook(mod, args, out, fn=fn):
                    new = fn(_main(out))
                    return None if new is None else _with_main(out, new)
                handles.append(module.register_forward_hook(hook))
            else:
                def pre_hook(mod, args, fn=fn):
                    new = fn(args[0])
                    return None if new is None else (new, *args[1:])
                handles.append(module.register_forward_pre_hook(pre_hook))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def recording(lm: LM, sites: Iterable[Site | str], detach: bool = True):
    """Yield a dict ``{site: hidden state}`` filled by each forward pass (last pass wins)."""
    store: dict[Site, Tensor] = {}

    def saver(site):
        def fn(h):
            store[site] = h.detach() if detach else h
        return fn

    sites = [Site.parse(s) for s in sites]
    with _hooks(lm, [(s, saver(s)) for s in sites]):
        yield store


Edits = (Mapping[Site, EditFn | list[EditFn]] | Mapping[str, EditFn | list[EditFn]]
         | Mapping[Site | str, EditFn | list[EditFn]])  # site -> fn or fns (keys: Site or str)


@contextmanager
def editing(lm: LM, edits: Edits):
    """Replace the hidden state at each site by ``fn(h)`` (several fns apply in order)."""
    pairs = []
    for site, fns in edits.items():
        for fn in (fns if isinstance(fns, (list, tuple)) else [fns]):
            pairs.append((Site.parse(site), fn))
    with _hooks(lm, pairs):
        yield


class _Stop(Exception):
    """Raised by a hook to end a forward pass once it has what it needs."""


def _raise_stop(*_):
    raise _Stop


_FORWARD_ORDER = {"att_z": 0, "att": 1, "mlp": 2, "res": 3}


def forward_order(site: Site) -> tuple[int, int]:
    """Order in which a forward pass reaches the sites."""
    return site.layer, _FORWARD_ORDER[site.kind]


@torch.no_grad()
def run_sites(lm: LM, input_ids: Tensor, sites: Iterable[Site | str],
              attention_mask: Tensor | None = None) -> dict[Site, Tensor]:
    """Hidden states at ``sites`` for one batch, skipping the layers after the last site."""
    sites = [Site.parse(s) for s in sites]
    last = lm.blocks[max(s.layer for s in sites)]
    with recording(lm, sites) as store:
        handle = last.register_forward_hook(_raise_stop)
        try:
            lm.model(input_ids=input_ids.to(lm.device), attention_mask=attention_mask,
                     use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
    return dict(store)


def hook_count(model: nn.Module) -> int:
    """Number of hooks registered anywhere in the model (0 when nothing leaked). The
    output-capturing hooks transformers installs for good on the first
    ``output_hidden_states=True`` call are not counted."""
    def counted(fn) -> bool:
        return not (getattr(fn, "__module__", None) or "").startswith("transformers.")
    return sum(counted(fn) for m in model.modules()
               for fn in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))


class SiteTaps:
    """Hooks at ``sites`` that record and patch per thread, so several threads can run forward
    passes of one model at once. Use inside ``with taps.installed():``."""

    def __init__(self, lm: LM, sites: Iterable[Site | str]):
        self.lm = lm
        self.sites = sorted({Site.parse(s) for s in sites}, key=forward_order)
        self._tls = threading.local()

    def _fn(self, site: Site):
        def fn(h: Tensor):
            st = self._tls
            record = getattr(st, "record", None)
            if record is not None and site in st.wanted:
                record[site] = h.detach()
            patch = getattr(st, "patch", None)
            new = patch[site](h) if patch and site in patch else None
            if getattr(st, "stop", None) == site:
                raise _Stop
            return new
        return fn

    def _block_input(self, mod, args, kwargs):
        inputs = getattr(self._tls, "inputs", None)
        if inputs is not None:
            inputs.append((args[0].detach(), args[1:], dict(kwargs)))

    @contextmanager
    def installed(self):
        handles = [b.register_forward_pre_hook(self._block_input, with_kwargs=True)
                   for b in self.lm.blocks]
        try:
            with editing(self.lm, {s: self._fn(s) for s in self.sites}):
                yield self
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def record(self, ids: Tensor, sites=None) -> dict[Site, Tensor]:
        """Hidden states at ``sites`` (default: all tapped), stopping after the last one."""
        wanted = self.sites if sites is None else [Site.parse(s) for s in sites]
        st = self._tls
        st.record, st.wanted = {}, set(wanted)
        st.stop = max(wanted, key=forward_order)
        try:
            self.lm.model(input_ids=ids.to(self.lm.device), use_cache=False)
        except _Stop:
            pass
        finally:
            out, st.record, st.stop = st.record, None, None
        return out

    @torch.no_grad()
    def loss(self, ids: Tensor, patch: Mapping[Site, EditFn] | None = None,
             block_inputs: list | None = None) -> tuple[float, int]:
        """Summed next-token loss over predictions made at positions 1..T-2, and their count.
        ``block_inputs``, a list, receives what each block is called with, in order:
        ``(hidden state, args, kwargs)`` (for ``loss_from``)."""
        st = self._tls
        st.patch, st.inputs = dict(patch or {}), block_inputs
        try:
            logits = self.lm.model(input_ids=ids.to(self.lm.device), use_cache=False).logits
        finally:
            st.patch = st.inputs = None
        return self._summed_loss(logits, ids)

    @torch.no_grad()
    def loss_from(self, layer: int, block_inputs: list, ids: Tensor,
                  patch: Mapping[Site, EditFn] | None = None) -> tuple[float, int]:
        """``loss(ids, patch)`` for a patch at sites of block ``layer`` or later, without
        rerunning the blocks before it. ``block_inputs`` are those of the unpatched pass of
        ``ids`` (``loss(ids, block_inputs=...)``): the hidden state entering block ``layer``,
        and the arguments (rotary embeddings, masks) the model passed each block. Then the
        final norm and the unembedding, with Gemma 2's logit soft-capping: the full pass's loss."""
        patch = dict(patch or {})
        early = [str(s) for s in patch if s.layer < layer]
        if early:
            raise ValueError(f"loss_from({layer}): the patch edits {', '.join(early)}, before "
                             f"block {layer}")
        if len(block_inputs) != self.lm.n_layers:
            raise ValueError(f"loss_from: block_inputs of {len(block_inputs)} blocks, the model "
                             f"has {self.lm.n_layers}")
        st = self._tls
        st.patch = patch
        try:
            h = block_inputs[layer][0]
            for block, (_, args, kwargs) in zip(self.lm.blocks[layer:], block_inputs[layer:]):
                h = _main(block(h, *args, **kwargs))
            norm, _ = self.lm.unembed()
            model: Any = self.lm.model  # a transformers PreTrainedModel
            logits = model.get_output_embeddings()(norm(h))
        finally:
            st.patch = None
        cap = getattr(self.lm.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return self._summed_loss(logits, ids)

    @staticmethod
    def _summed_loss(logits: Tensor, ids: Tensor) -> tuple[float, int]:
        pred = logits[:, 1:-1].float().reshape(-1, logits.shape[-1])
        target = ids[:, 2:].reshape(-1).to(pred.device)
        return float(F.cross_entropy(pred, target, reduction="sum")), target.numel()


class BlockRerun:
    """Call decoder block ``layer`` directly, with the extra arguments the model passes it
    (rotary embeddings, mask), captured from a one-row pass of the same length, once per
    length."""

    def __init__(self, lm: LM, layer: int):
        self.lm, self.layer = lm, layer
        self._kw: dict[int, tuple] = {}

    def prepare(self, T: int) -> None:
        """Capture the arguments for sequences of length ``T`` (run it before any editing
        hook exists: the capture pass must run clean)."""
        if T in self._kw:
            return

        def grab(mod, args, kwargs):
            self._kw[T] = (args[1:], dict(kwargs))
            raise _Stop

        handle = self.lm.blocks[self.layer].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self.lm.model(input_ids=torch.zeros(1, T, dtype=torch.long, device=self.lm.device),
                          use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()

    def __call__(self, h_BTD: Tensor) -> Tensor:
        self.prepare(h_BTD.shape[1])
        args, kwargs = self._kw[h_BTD.shape[1]]
        return _main(self.lm.blocks[self.layer](h_BTD, *args, **kwargs))
