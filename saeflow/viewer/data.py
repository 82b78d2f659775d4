"""What the viewer's API reads from an atlas: overview, feature search, feature records, flow
graphs and their exports. Plain Python over ``saeflow.atlas.Atlas`` (no Flask here).

Search: a query that is a feature id (``12/res/4111``) opens that feature; a site
(``12/res``) lists its features; a number lists that index at every site; any other text is a
case-insensitive substring of the promoted-token labels (the atlas's ``labels/*.bin`` blobs,
searched in place) and, when contexts were computed, of each feature's top activating tokens
with a few tokens of lead-in. Label hits rank before context hits, earlier-promoted tokens
before later ones, then by site. A text query stops collecting after ``MAX_HITS`` hits and says
so. The context index is built in a background thread when the viewer starts.

Lineage classes carry the atlas's names per layer (``Atlas.class_names``): a layer without a
previous residual SAE has ``no_prev_*`` classes instead of ``newborn_*``/``unexplained``.

Speed: the atlas does not change while the viewer runs, so flow graphs, their encoded JSON
(graph and layout), searches and share curves are computed once per key and kept in bounded
caches (``_Memo``); concurrent requests for one key wait for one computation. Graphs are
traced over one ``flow.FlowIndex`` (the top-1 links in RAM, children indexed), and every
feature's label is read once, by the background thread, when the atlas has at most
``PREFILL_LABELS`` features (else labels are cached as graphs and pages ask for them).
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from saeflow.flow import BLOCK_THRESHOLD, RES_THRESHOLD
from saeflow.layout import KIND_COLORS
from saeflow.sites import Feature, Site
from saeflow.thresholds import _span

MAX_HITS = 20_000
MAX_GRAPH_NODES = 300  # default cap of a traced graph in the viewer (the API allows 1..1000)
PREFILL_LABELS = 500_000  # atlases up to this many features get every label read at start
MIME = {"json": ("application/json", "json"), "graphml": ("application/xml", "graphml"),
        "dot": ("text/vnd.graphviz", "dot"), "svg": ("image/svg+xml", "svg"),
        "png": ("image/png", "png"), "neuronpedia": ("application/json", "neuronpedia.json")}


def _num(x, digits: int = 4):
    """A JSON-safe float (None for NaN/inf)."""
    if x is None:
        return None
    x = float(x)
    return round(x, digits) if math.isfinite(x) else None


class _Blob:
    """One site's searchable text: lowercase bytes plus per-feature offsets [F + 1]."""

    def __init__(self, data: bytes, off: np.ndarray, strings: list[str] | None = None):
        self.data, self.off = data, off
        self.strings = strings  # the original texts (kept for context snippets)

    @classmethod
    def from_strings(cls, strings: list[str]) -> _Blob:
        parts = [s.lower().replace("\n", " ").encode("utf-8") for s in strings]
        off = np.zeros(len(parts) + 1, dtype=np.int64)
        off[1:] = np.cumsum([len(p) + 1 for p in parts])
        return cls(b"\n".join(parts) + b"\n", off, strings)

    def find(self, needle: bytes, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """Feature indices with a hit and the hit's offset inside the feature's text."""
        pos = []
        start = self.data.find(needle)
        while start >= 0 and len(pos) < limit:
            pos.append(start)
            start = self.data.find(needle, start + 1)
        if not pos:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        p = np.asarray(pos, dtype=np.int64)
        idx = np.searchsorted(self.off, p, side="right") - 1
        ok = p + len(needle) <= self.off[idx + 1]  # a hit must not run into the next feature
        idx, p = idx[ok], p[ok]
        first = np.unique(idx, return_index=True)[1]  # first hit per feature
        return idx[first], (p - self.off[idx])[first]


def encode(data) -> bytes:
    """Compact JSON bytes (what the API sends)."""
    return json.dumps(data, separators=(",", ":"), allow_nan=False).encode("utf-8")


class _Memo:
    """A bounded LRU of computed values. Concurrent ``get``s of one missing key compute it
    once: the others wait for that result (a failure is recomputed by the next caller)."""

    def __init__(self, size: int):
        self.size = size
        self._data: OrderedDict = OrderedDict()
        self._busy: dict = {}
        self._lock = threading.Lock()

    def get(self, key, make: Callable[[], object]):
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
            event = self._busy.get(key)
            owner = event is None
            if owner:
                event = self._busy[key] = threading.Event()
        if not owner:
            event.wait()
            with self._lock:
                if key in self._data:
                    return self._data[key]
            return make()
        try:
            value = make()
            with self._lock:
                self._data[key] = value
                while len(self._data) > self.size:
                    self._data.popitem(last=False)
            return value
        finally:
            with self._lock:
                self._busy.pop(key).set()


class _Hits:
    """Text-search hits as columns (rank, offset, site, index), sliced into features lazily."""

    def __init__(self, cols: np.ndarray, sites: list[Site]):
        self.cols, self.sites = cols, sites

    def __len__(self) -> int:
        return self.cols.shape[1]

    def __getitem__(self, window: slice) -> list[tuple[Feature, str]]:
        rank, _, site, idx = self.cols[:, window].tolist()
        return [(self.sites[s].feature(i), ("label", "contexts")[r])
                for r, s, i in zip(rank, site, idx)]


class AtlasView:
    def __init__(self, atlas, contexts=None, suite=None, permutations=None):
        from saeflow.export import FORMATS
        from saeflow.lineage import CLASSES, COLORS
        self.export_formats = tuple(f for f in FORMATS if f in MIME)
        self.atlas, self.contexts = atlas, contexts
        self.colors: dict[str, str] = dict(COLORS)
        self.widths: dict[Site, int] = atlas.widths
        self.sites: list[Site] = sorted(self.widths)
        self.layers: list[int] = sorted({s.layer for s in self.sites})
        # class names per residual layer, as the atlas names them (no_prev_* without R_{L-1})
        self.class_names: dict[int, tuple[str, ...]] = {
            L: tuple(atlas.class_names(L)) for L in atlas.layers}
        self.no_previous: list[int] = [L for L in atlas.layers if not atlas.has_previous(L)]
        present = {c for names in self.class_names.values() for c in names}
        self.classes: list[str] = [c for c in CLASSES if c in present] + sorted(
            present - set(CLASSES), key=lambda c: list(COLORS).index(c) if c in COLORS else 99)
        self.kinds: list[str] = sorted({s.kind for s in self.sites},
                                       key=lambda k: ("res", "mlp", "att", "att_z").index(k))
        self._label_blobs: dict[Site, _Blob | None] = {}
        self._context_blobs: dict[Site, _Blob] = {}
        self._context_ready = threading.Event()
        self._stop = threading.Event()
        self._indexer: threading.Thread | None = None
        self._lock = threading.Lock()
        self._cut_keys: dict[tuple, tuple] = {}
        self._graphs = _Memo(256)  # FlowGraph per (feature, cuts, cap, below_null)
        self._layouts = _Memo(256)  # its layout's JSON (the exports need none)
        self._graph_bytes = _Memo(256)  # the /api/graph answer, encoded
        self._searches = _Memo(64)
        self._curves = _Memo(8)
        self._label_cache: dict[Feature, str] = {}
        self._site_labels: dict[Site, list[str]] = {}  # every label of a site, read at start
        self._labels_ready = threading.Event()
        from saeflow.flow import FlowIndex
        self.flow_index = FlowIndex(atlas, label=self.label)
        self._overview: dict | None = None
        self._chains = None  # PermutationChains, opened on first use (it imports torch)
        self._chain_args = (suite, permutations)
        self._chains_lock = threading.Lock()
        self._render_lock = threading.Lock()  # matplotlib's pyplot is not thread-safe

    # ---- identity ----------------------------------------------------------------------------
    def check_feature(self, f: Feature) -> str | None:
        """None if the atlas has ``f``, else why not."""
        if f.site not in self.widths:
            return (f"the atlas has no site {f.site}; its sites are "
                    f"{', '.join(map(str, self.sites[:12]))}{' ...' if len(self.sites) > 12 else ''}")
        if f.index >= self.widths[f.site]:
            return (f"feature {f} is out of range: site {f.site} has {self.widths[f.site]} "
                    f"features (0..{self.widths[f.site] - 1})")
        return None

    def lineage(self, f: Feature) -> str | None:
        if f.kind != "res":
            return None
        return self.class_names[f.layer][int(self.atlas.lineage_codes(f.layer)[f.index])]

    def label(self, f: Feature) -> str:
        labels = self._site_labels.get(f.site)
        if labels is not None:
            return labels[f.index]
        label = self._label_cache.get(f)
        if label is None:
            if len(self._label_cache) > 100_000:
                self._label_cache.clear()
            label = self._label_cache[f] = self.atlas.label(f)
        return label

    # ---- overview ----------------------------------------------------------------------------
    def _suite_info(self) -> dict:
        root = (self.atlas.info.get("suite") or {}).get("root")
        path = Path(root) / "suite.json" if root else None
        if path is None or not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def overview(self, steering: dict | None = None) -> dict:
        if self._overview is None:  # the atlas does not change while the viewer runs
            self._overview = self._static_overview()
        return {**self._overview, "contexts": self.contexts.info() if self.contexts else None,
                "steering": steering or {}}

    def _static_overview(self) -> dict:
        info = self.atlas.info
        suite = self._suite_info()
        quality = {}
        if suite.get("quality_summary"):
            quality["summary"] = suite["quality_summary"]
        if suite.get("quality"):
            quality["sites"] = {r["site"]: {k: r.get(k) for k in
                                            ("fvu", "l0", "dead_frac", "loss_recovered")}
                                for r in suite["quality"] if "site" in r}
        counts: dict[str, int] = {}
        for s in self.sites:
            counts[s.kind] = counts.get(s.kind, 0) + 1
        fr = self.atlas.named_fractions()
        return {
            "name": (info.get("suite") or {}).get("name") or self.atlas.root.name,
            "model": info.get("model"), "atlas": str(self.atlas.root),
            "layers": self.layers, "kinds": self.kinds, "site_counts": counts,
            "sites": [str(s) for s in self.sites],
            "widths": {str(s): w for s, w in self.widths.items()},
            "n_features": int(sum(self.widths.values())),
            "classes": self.classes, "colors": self.colors, "no_previous": self.no_previous,
            "class_fractions": {str(L): {c: _num(v) for c, v in d.items()} for L, d in fr.items()},
            "thresholds": {str(L): {k: _num(v) for k, v in t.items()}
                           for L, t in self.atlas.thresholds.items()},
            "null_thresholds": {str(L): {k: _num(v) for k, v in t.items()}
                                for L, t in self.atlas.null_thresholds.items()},
            "threshold_rule": info.get("threshold_rule"),
            "settings": {k: v for k, v in info.get("settings", {}).items()},
            "quality": quality,
            "training": {k: suite["training"].get(k) for k in
                         ("tokens_trained", "wall_seconds", "source") if k in suite["training"]}
            if isinstance(suite.get("training"), dict) else {},
            "export_formats": list(self.export_formats),
            "kind_colors": dict(KIND_COLORS),
            "graph_defaults": {"res_threshold": RES_THRESHOLD,
                               "block_threshold": BLOCK_THRESHOLD,
                               "max_nodes": MAX_GRAPH_NODES},
        }

    # ---- search ------------------------------------------------------------------------------
    def _labels_blob(self, site: Site) -> _Blob | None:
        if site not in self._label_blobs:
            folder = self.atlas.root / "labels"
            off_path, bin_path = folder / f"{site.slug}.off.npy", folder / f"{site.slug}.bin"
            blob = None
            if off_path.exists() and bin_path.exists():
                off = np.load(off_path).astype(np.int64)
                data = bin_path.read_bytes().lower()
                blob = _Blob(data, off)
            self._label_blobs[site] = blob
        return self._label_blobs[site]

    def start_indexing(self) -> None:
        """Read the label blobs and build the context index in a background thread, then
        read every feature's label (small atlases: ``PREFILL_LABELS``)."""
        def build():
            try:
                for site in self.sites:
                    if self._stop.is_set():
                        return
                    self._labels_blob(site)
                contexts = self.contexts
                for site in (contexts.sites if contexts is not None else []):
                    if self._stop.is_set():
                        return
                    if contexts is not None and site in self.widths:
                        self._context_blobs[site] = _Blob.from_strings(contexts.peak_texts(site))
            finally:
                self._context_ready.set()
            try:
                self._prefill_labels()
            finally:
                self._labels_ready.set()
        self._indexer = threading.Thread(target=build, name="saeflow-viewer-index", daemon=True)
        self._indexer.start()

    def close(self) -> None:
        """Stop the background indexing (it stops between sites)."""
        self._stop.set()
        if self._indexer is not None:
            self._indexer.join(timeout=30)

    def _prefill_labels(self) -> None:
        if sum(self.widths.values()) > PREFILL_LABELS:
            return
        for site in self.sites:
            if self._stop.is_set():
                return
            self._site_labels[site] = [self.atlas.label(site.feature(i))
                                       for i in range(self.widths[site])]

    def index_status(self) -> dict:
        return {"contexts": self.contexts is not None, "ready": self._context_ready.is_set(),
                "sites_indexed": len(self._context_blobs),
                "labels_ready": self._labels_ready.is_set()}

    def _row(self, f: Feature, match: str | None = None, query: str = "") -> dict:
        snippet = None
        blob = self._context_blobs.get(f.site) if match == "contexts" else None
        if blob is not None and blob.strings is not None:
            snippet = next((part for part in blob.strings[f.index].split(" | ")
                            if query.lower() in part.lower()), None)
        return {"id": str(f), "site": str(f.site), "layer": f.layer, "kind": f.kind,
                "index": f.index, "lineage": self.lineage(f), "label": self.label(f),
                "match": match, "snippet": snippet}

    def search(self, query: str = "", lineage: str | None = None, layer: int | None = None,
               kind: str | None = None, limit: int = 50, offset: int = 0) -> dict:
        sites = [s for s in self.sites if (layer is None or s.layer == layer)
                 and (kind is None or s.kind == kind) and (lineage is None or s.kind == "res")]
        q = query.strip()
        truncated = False
        if not q:
            page = self._browse(sites, lineage, offset + limit, offset)
            total = self._browse_total(sites, lineage)
        else:
            key = (q.lower(), lineage, layer, kind, self._context_ready.is_set())
            hits, truncated = self._searches.get(key, lambda: self._query(q, sites, lineage))
            total = len(hits)
            page = hits[offset:offset + limit]
        return {"query": q, "total": total, "offset": offset, "limit": limit,
                "truncated": truncated, "index_ready": self._context_ready.is_set(),
                "results": [self._row(f, m, q) for f, m in page]}

    def _lineage_mask(self, site: Site, lineage: str | None) -> np.ndarray | None:
        if lineage is None:
            return None
        names = self.class_names.get(site.layer, ())
        codes = np.asarray(self.atlas.lineage_codes(site.layer))
        return codes == names.index(lineage) if lineage in names else np.zeros(len(codes), bool)

    def _browse_total(self, sites: list[Site], lineage: str | None) -> int:
        total = 0
        for s in sites:
            mask = self._lineage_mask(s, lineage)
            total += self.widths[s] if mask is None else int(mask.sum())
        return total

    def _browse(self, sites: list[Site], lineage: str | None, upto: int, skip: int = 0) -> list:
        """Features of ``sites`` in order (lineage-filtered), from ``skip`` to ``upto``."""
        out: list[tuple[Feature, str | None]] = []
        seen = 0
        for s in sites:
            mask = self._lineage_mask(s, lineage)
            idx = np.arange(self.widths[s]) if mask is None else np.flatnonzero(mask)
            lo, hi = max(0, skip - seen), max(0, upto - seen)
            out.extend((s.feature(int(i)), None) for i in idx[lo:hi])
            seen += len(idx)
            if seen >= upto:
                break
        return out

    def _query(self, q: str, sites: list[Site], lineage: str | None):
        try:
            f = Feature.parse(q)
            return ([(f, "id")] if self.check_feature(f) is None and f.site in sites else []), False
        except ValueError:
            pass
        if re.fullmatch(r"\d+[/-](res|mlp|att_z|att)", q):
            site = Site.parse(q)
            return self._browse([site] if site in sites else [], lineage, MAX_HITS), False
        if q.isdigit():
            i = int(q)
            return [(s.feature(i), "index") for s in sites if i < self.widths[s]
                    and (lineage is None or self.lineage(s.feature(i)) == lineage)], False
        needle = q.lower().encode("utf-8")
        cols: list[np.ndarray] = []  # per (kind of hit, site): [4, n] rows rank, offset, site, index
        budget = MAX_HITS
        seen = {}  # site -> boolean [F]: already hit through its label
        for rank, blobs in enumerate((self._labels_blob, self._context_blobs.get)):
            for si, s in enumerate(sites):
                blob = blobs(s)
                if blob is None or budget <= 0:
                    continue
                idx, at = blob.find(needle, budget)
                mask = self._lineage_mask(s, lineage)
                keep = np.ones(len(idx), bool) if mask is None else mask[idx]
                if rank == 1 and s in seen:
                    keep &= ~seen[s][idx]
                idx, at = idx[keep], at[keep]
                if rank == 0:
                    seen[s] = np.zeros(self.widths[s], bool)
                    seen[s][idx] = True
                budget -= len(idx)
                cols.append(np.stack([np.full(len(idx), rank), at, np.full(len(idx), si), idx]))
        if not cols:
            return [], False
        hits = np.concatenate(cols, axis=1)  # [4, n]
        order = np.lexsort(hits[::-1])  # by rank, then offset, then site, then index
        return _Hits(hits[:, order], sites), budget <= 0

    # ---- one feature ------------------------------------------------------------------------
    def feature(self, f: Feature, n_successors: int = 5, n_contexts: int = 8) -> dict:
        atlas = self.atlas
        k = int(atlas.info.get("settings", {}).get("k", 1))
        th = atlas.thresholds.get(f.layer, {}) if f.kind == "res" else {}
        preds = []
        if f.kind == "res":
            for kind, matches in atlas.predecessors_topk(f, min(k, 5)).items():
                g, cos = matches[0]
                preds.append({"kind": kind, "id": str(g), "cos": _num(cos),
                              "label": self.label(g), "high": bool(cos >= th.get(kind, 2.0)),
                              "alternatives": [{"id": str(a), "cos": _num(c)}
                                               for a, c in matches[1:]]})
            for kind in ("res", "mlp", "att"):
                if kind not in {p["kind"] for p in preds}:
                    preds.append({"kind": kind, "id": None, "cos": None, "label": None,
                                  "high": False, "alternatives": []})
            preds.sort(key=lambda p: ("res", "mlp", "att").index(p["kind"]))
        succ = [{"id": str(g), "cos": _num(c), "label": self.label(g), "lineage": self.lineage(g)}
                for g, c in atlas.successors(f, min(k, n_successors))]
        children = [{"id": str(g), "cos": _num(c)} for g, c in atlas.children(f)[:50]]
        contexts = None
        if self.contexts is not None and f.site in self.contexts.sites:
            contexts = [c._asdict() for c in self.contexts.top(f, n_contexts)]
            for c in contexts:
                c["activation"] = _num(c["activation"])
        width = self.widths[f.site]
        return {"id": str(f), "site": str(f.site), "layer": f.layer, "kind": f.kind,
                "index": f.index, "width": width, "label": self.label(f),
                "lineage": self.lineage(f), "thresholds": {k_: _num(v) for k_, v in th.items()},
                "predecessors": preds, "successors": succ, "children": children,
                "promoted_tokens": atlas.tokens(f), "contexts": contexts,
                "prev": str(f.site.feature(f.index - 1)) if f.index > 0 else None,
                "next": str(f.site.feature(f.index + 1)) if f.index + 1 < width else None}

    # ---- share curves ------------------------------------------------------------------------
    def share_curves(self, vary: str = "all") -> bytes:
        """``Atlas.share_curves`` (the class shares as a threshold sweeps a grid), with each
        layer's classes under its own names, encoded (cached per ``vary``)."""
        def make() -> bytes:
            data = self.atlas.share_curves(vary=vary)
            data["layers"] = {L: {self.class_names[int(L)][i]: [_num(v) for v in per[c]]
                                  for i, c in enumerate(data["classes"])}
                              for L, per in data["layers"].items()}
            for key in ("thresholds", "null_thresholds"):
                data[key] = {L: {k: _num(v) for k, v in t.items()} for L, t in data[key].items()}
            data["classes"] = self.classes
            return encode(data)
        return self._curves.get(vary, make)

    # ---- permutation chains ------------------------------------------------------------------
    def permutation_chain(self, f: Feature) -> dict:
        """``PermutationChains.chain`` of ``f`` (saeflow.viewer.permutations)."""
        with self._chains_lock:
            if self._chains is None:
                from saeflow.viewer.permutations import PermutationChains
                suite, root = self._chain_args
                self._chains = PermutationChains(self.atlas, suite, root)
        return self._chains.chain(f, self)

    # ---- graphs -------------------------------------------------------------------------------
    def graph(self, f: Feature, res_threshold: float = RES_THRESHOLD,
              block_threshold: float = BLOCK_THRESHOLD,
              max_nodes: int = MAX_GRAPH_NODES, below_null: bool = False):
        """The traced flow graph (cached); it stops growing at ``max_nodes`` (then its
        ``settings["truncated"]`` is true): larger graphs are slow to trace and unreadable."""
        return self._traced(f, res_threshold, block_threshold, max_nodes, below_null)[0]

    def _cuts(self, res_threshold: float, block_threshold: float, below_null: bool) -> tuple:
        """The per-layer cuts ``trace`` applies (``Atlas.flow_cuts``), hashable: thresholds
        that give the same cuts (say, any two below the atlas's own) give the same graph."""
        key = (round(res_threshold, 4), round(block_threshold, 4), below_null)
        with self._lock:
            got = self._cut_keys.get(key)
        if got is None:
            cuts = self.atlas.flow_cuts(res_threshold, block_threshold, below_null, warn=False)[0]
            got = tuple((L, *(c.get(k) if k in self.atlas.sources(L) else None
                              for k in ("res", "mlp", "att")))  # a cut with no source is unused
                        for L, c in sorted(cuts.items()))
            with self._lock:
                if len(self._cut_keys) > 4096:
                    self._cut_keys.clear()
                self._cut_keys[key] = got
        return got

    def _traced(self, f: Feature, res_threshold: float, block_threshold: float, max_nodes: int,
                below_null: bool):
        """(graph with these thresholds in its settings, its cache key); the tracing is cached
        per cuts, so a slider that moves below a layer's threshold costs no new trace."""
        from saeflow.flow import FlowGraph, trace

        key = (f, self._cuts(res_threshold, block_threshold, below_null), max_nodes, below_null)
        graph = self._graphs.get(key, lambda: trace(
            self.atlas, f, res_threshold, block_threshold, max_nodes=max_nodes,
            below_null=below_null, index=self.flow_index))
        if (graph.settings["res_threshold"], graph.settings["block_threshold"]) != (
                res_threshold, block_threshold):
            graph = FlowGraph(graph.seed, graph.nodes, graph.edges,
                              {**graph.settings, "res_threshold": res_threshold,
                               "block_threshold": block_threshold})
        return graph, key

    def graph_json(self, f: Feature, res_threshold: float, block_threshold: float,
                   max_nodes: int = MAX_GRAPH_NODES, below_null: bool = False) -> dict:
        from saeflow.layout import layout
        graph, key = self._traced(f, res_threshold, block_threshold, max_nodes, below_null)
        data = graph.to_json()
        # the positions the SVG/PNG export uses (the same for every threshold of one trace)
        data["layout"] = self._layouts.get(key, lambda: layout(graph).to_json())
        for n, node in zip(data["nodes"], graph.nodes):
            n["kind"] = node.feature.kind
            n["score"] = _num(n["score"])
        for e in data["edges"]:
            e["cos"] = _num(e["cos"])
        data["formats"] = list(self.export_formats)
        data["notes"] = self.threshold_notes(graph)
        return data

    def graph_bytes(self, f: Feature, res_threshold: float, block_threshold: float,
                    max_nodes: int = MAX_GRAPH_NODES, below_null: bool = False) -> bytes:
        """``graph_json`` encoded, cached: the answer of ``/api/graph``."""
        key = (f, round(res_threshold, 4), round(block_threshold, 4), max_nodes, below_null)
        return self._graph_bytes.get(key, lambda: encode(self.graph_json(
            f, res_threshold, block_threshold, max_nodes, below_null)))

    def threshold_notes(self, graph) -> list[str]:
        """What the page should say about the thresholds of ``graph``: where the user's numbers
        are below a layer's null (and so were raised to the atlas's rule, or, with
        ``below_null``, admit chance matches: ``trace``'s warnings)."""
        st = graph.settings
        notes = list(st.get("warnings") or [])
        if st.get("below_null"):
            return notes
        nulls = self.atlas.null_thresholds
        layers = [L for L in graph.layers if L in nulls] or \
            [L for L in self.layers if L in nulls]
        asked = {"res": st.get("res_threshold"), "mlp": st.get("block_threshold"),
                 "att": st.get("block_threshold")}
        for kind, what in (("res", "residual chain s(R)"), ("mlp", "MLP s(M)"),
                           ("att", "attention s(A)")):
            low = [L for L in layers if asked[kind] is not None
                   and math.isfinite(nulls[L].get(kind, math.nan))
                   and asked[kind] < nulls[L][kind]]
            if low:
                hi = max(nulls[L][kind] for L in low)
                notes.append(f"{what} {asked[kind]:.2f} is below the null (up to {hi:.3f}) "
                             f"at layers {_span(low)}: there the graph keeps only "
                             "links above the null, by the atlas's rule (tick 'below null' "
                             "to admit chance-level links)")
        return notes

    def export(self, f: Feature, fmt: str, res_threshold: float, block_threshold: float,
               max_nodes: int = MAX_GRAPH_NODES, below_null: bool = False):
        from saeflow.export import render
        graph = self.graph(f, res_threshold, block_threshold, max_nodes, below_null)
        with self._render_lock:
            body = render(graph, fmt)
        mime, ext = MIME[fmt]
        return body, mime, f"flow-{f.site.slug}-{f.index}.{ext}"
