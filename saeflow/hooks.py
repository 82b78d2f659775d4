"""Read and edit hidden states at sites, with plain PyTorch hooks behind context managers.

Every context manager here removes its hooks in ``finally``, so the model is restored also
when the forward pass or generation raises. Hidden states are ``[batch, tokens, width]``.

- ``recording(lm, sites)``: a dict that fills with each site's hidden state on every forward.
- ``editing(lm, {site: fn})``: ``fn(h) -> h`` replaces the hidden state at the site.
- ``run_sites(lm, ids, sites)``: one forward pass that stops after the last layer it needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from saeflow.models import LM
from saeflow.sites import Site

EditFn = Callable[[Tensor], Tensor]


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


@contextmanager
def editing(lm: LM, edits: Mapping[Site | str, EditFn | list[EditFn]]):
    """Replace the hidden state at each site by ``fn(h)`` (several fns apply in order)."""
    pairs = []
    for site, fns in edits.items():
        for fn in (fns if isinstance(fns, (list, tuple)) else [fns]):
            pairs.append((Site.parse(site), fn))
    with _hooks(lm, pairs):
        yield


class _Stop(Exception):
    pass


def _raise_stop(*_):
    raise _Stop


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
