"""A residual feature's permutation chain for the viewer ("Mechanistic Permutability",
Balagansky et al., ICLR 2025, secs. 3-4; ``saeflow.permutation``).

The chain of feature i at layer L follows the one-to-one matches of consecutive residual SAEs:
forward P(L -> L+1)[i], then P(L+1 -> L+2) of that, and so on (the composition of sec. 4.3);
backward the inverse permutations. The viewer shows it beside the cosine flow graph, whose
residual links are the atlas's top-1 cosine matches instead.

Choices:
  - the permutations are the ones ``saeflow permute SUITE`` stored, read through
    ``PermutationStore(read_only=True)``: the viewer never writes, clears or computes them (a
    chain needs every consecutive pair, about a second of assignment each on the starter, so
    it is not cheap enough for a request); a missing pair ends the chain there and the answer
    names the command that computes it;
  - which stored permutations: the default objective and folding (``PermutationConfig()``)
    when stored, else the first folder stored for the suite, under that folder's own settings;
  - each link carries the atlas's cosine between its two features when the partner is among
    the atlas's stored top-k successors (else null), its rank there, and whether it is the
    top-1, i.e. the cosine flow graph's residual link.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict
from pathlib import Path

import numpy as np

from saeflow.sites import Feature, Site


class PermutationChains:
    """Permutation chains of an atlas's residual features, from stored permutations."""

    def __init__(self, atlas, suite=None, root: str | Path | None = None):
        self.atlas = atlas
        self.reason: str | None = None
        self.store = None
        self.command = "saeflow permute SUITE"
        self._perms: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()
        try:
            self._open(suite, root)
        except (OSError, ValueError, KeyError, TypeError) as e:  # a broken store: say so
            self.store, self.reason = None, f"the stored permutations cannot be read: {e}"

    def _open(self, suite, root) -> None:
        from saeflow.permutation import (SCHEMA, SETTINGS_JSON, PermutationConfig,
                                         PermutationStore, default_out)
        if suite is None:
            from saeflow.suite import atlas_suite_root, read_suite
            found = atlas_suite_root(self.atlas)
            if found is None:
                self.reason = ("the atlas's suite folder is not on this machine, so its stored "
                               "permutations cannot be checked against its SAE files")
                return
            suite = read_suite(found)
        self.command = f"saeflow permute {suite.root or suite.name}"
        folder = Path(root) if root is not None else default_out(suite)
        default = PermutationConfig()
        found_configs = []
        for sub in sorted(folder.iterdir()) if folder.is_dir() else []:
            path = sub / SETTINGS_JSON
            if not path.is_file():
                continue
            settings = json.loads(path.read_text())
            if settings.get("schema") != SCHEMA or settings.get("suite") != suite.name:
                continue
            config = PermutationConfig(**settings["config"])
            found_configs.append(config)
        if not found_configs:
            self.reason = (f"no permutations are stored for suite {suite.name!r} in {folder}: "
                           f"run `{self.command}`")
            return
        config = next((c for c in found_configs if c.tag == default.tag), found_configs[0])
        self.store = PermutationStore(suite, config, folder, read_only=True)

    def status(self) -> dict:
        st = self.store
        return {"available": st is not None, "reason": self.reason, "command": self.command,
                "folder": str(st.folder) if st is not None else None,
                "config": asdict(st.config) if st is not None else None}

    def _pair(self, layer: int) -> tuple[np.ndarray, np.ndarray, dict]:
        """(perm, inverse, stats) of P(layer -> layer + 1); KeyError when not stored."""
        from saeflow.permutation import inverse
        assert self.store is not None
        a, b = Site(layer, "res"), Site(layer + 1, "res")
        with self._lock:
            res = self.store.get(a, b)
            if layer not in self._perms:
                self._perms[layer] = (res.perm.numpy(), inverse(res.perm).numpy())
        perm, inv = self._perms[layer]
        return perm, inv, {"a": str(a), "b": str(b), "mse": res.mse, "mean_cos": res.mean_cos}

    def chain(self, f: Feature, view) -> dict:
        """The chain of ``f`` over every residual layer the stored pairs reach (module
        docstring). ``view`` gives labels and lineage classes."""
        out = {"feature": str(f), **self.status(), "chain": [], "pairs": [], "missing": []}
        if f.kind != "res":
            out.update(available=False, reason="permutation chains link residual features; "
                                               "open a residual feature")
            return out
        if self.store is None:
            return out
        layers = {s.layer for s in self.atlas.widths if s.kind == "res"}
        nodes = {f.layer: f.index}
        pairs = {}
        for step in (1, -1):
            L, i = f.layer, f.index
            while (L + step) in layers:
                lo = min(L, L + step)
                try:
                    perm, inv, stats = self._pair(lo)
                except KeyError:
                    out["missing"].append(f"{lo}/res -> {lo + 1}/res")
                    break
                pairs[lo] = stats
                i = int(perm[i] if step == 1 else inv[i])
                L += step
                nodes[L] = i
        for L in sorted(nodes):
            g = Site(L, "res").feature(nodes[L])
            link = self._link(Site(L - 1, "res").feature(nodes[L - 1]), g) \
                if L - 1 in nodes else {"cos": None, "rank": None, "top1": None}
            out["chain"].append({"id": str(g), "layer": L, "label": view.label(g),
                                 "lineage": view.lineage(g), **link})
        out["pairs"] = [pairs[L] for L in sorted(pairs)]
        if out["missing"]:
            out["reason"] = (f"the permutations {', '.join(out['missing'])} are not stored in "
                             f"{out['folder']}: run `{self.command}`")
        return out

    def _link(self, a: Feature, b: Feature) -> dict:
        """The atlas's cosine of a -> b when b is among a's stored successors."""
        k = int(self.atlas.info.get("settings", {}).get("k", 1))
        succ = self.atlas.successors(a, k)
        for rank, (g, cos) in enumerate(succ):
            if g == b:
                return {"cos": round(float(cos), 4), "rank": rank + 1, "top1": rank == 0}
        return {"cos": None, "rank": None, "top1": False}
