"""Neuronpedia and circuit-tracer: attribution-graph export, explanation labels, feature links.

Graph export (``graph_json``, ``write_graph_folder``). circuit-tracer's frontend (0.5.0) and
Neuronpedia's graph viewer read an attribution graph: ``{metadata, qParams, nodes, links}``,
built for token positions. A flow graph fits it by using the site kind as the column
(``ctx_idx``: att 0, res 1, mlp 2, so att -> res and mlp -> res links join neighbouring columns
and never run through a third node) and the layer as the row. Choices the format forces:
  - ``feature`` is the paired code ``schema_version: 1`` announces: Cantor pairing of
    ``(3 * layer + column, index)``, unique per feature across sites, and its second half is
    the SAE index, so the frontend titles ``3/res/5`` "L3/5" (the clerp names the site).
  - one embedding node per column (the frontend labels the columns with them) and one logit
    node one row above the graph's top layer, which the frontend needs to give every layer a
    row (without it it assumes 26 layers). A flow graph has no output token: the logit node is
    a row marker, ``Output "readout" (p=0.000)``, with no links.
  - ``influence`` is small-is-important, as circuit-tracer prunes with it: the cumulative share
    of the nodes' scores (edge cosines; the seed's is 1) taken in decreasing order, so the seed
    has the smallest value; ``metadata.node_threshold`` is 1.0 (every node shown).
  - ``metadata.scan`` is ``./data/features``: the frontend then loads feature files from the
    served folder (``features/<feature>.json``) instead of the internet.
``write_graph_folder`` writes what circuit-tracer's local server serves as its data folder:
``<slug>.json``, ``graph-metadata.json`` (the index; other graphs' entries are kept) and
``features/<feature>.json`` for every feature node. To look at it::

    saeflow graph ATLAS 12/res/4111 --format neuronpedia --out graphs/
    pip install --no-deps circuit-tracer==0.5.0   # its frontend and server: standard library
    python -c "from circuit_tracer.frontend.local_server import serve; serve('graphs'); input()"
    # open http://localhost:8032/index.html (the page loads d3 from the internet); Enter stops

Labels (``read_explanations``, ``NeuronpediaIds``). Neuronpedia's explanation exports live at
``v1/{modelId}/{source}/explanations/batch-N.jsonl.gz`` (one JSON row per line with ``index``,
``description``, ``explanationModelName``, ...). ``read_explanations`` reads them from a local
folder; where several rows explain one index the first in batch order is used. A suite has
Neuronpedia ids when its ``suite.json`` says so (``"neuronpedia": {"model": "gemma-2-2b",
"sources": {"12/res": "12-gemmascope-res-16k", ...}}`` or a ``"source"`` pattern with
``{layer}`` and ``{kind}``) or its SAE files name a ``neuronpedia_id`` (SAELens configs);
``feature_url`` links a feature to ``https://neuronpedia.org/{modelId}/{source}/{index}``.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from saeflow.flow import FlowGraph
from saeflow.io import write_json_atomic
from saeflow.sites import Feature, Site

COLUMNS = {"att": 0, "att_z": 0, "res": 1, "mlp": 2}
COLUMN_NAMES = ["att", "res", "mlp"]
SCAN = "./data/features"
NEURONPEDIA = "https://neuronpedia.org"
_BATCH_RE = re.compile(r"batch-(\d+)\.jsonl(\.gz)?$")


def cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def feature_code(f: Feature) -> int:
    """The node's ``feature``: unique per feature, second half of the pair = SAE index."""
    return cantor(3 * f.layer + COLUMNS[f.kind], f.index)


def node_id(f: Feature) -> str:
    return f"{f.layer}_{f.index}_{COLUMNS[f.kind]}"


def _influence(graph: FlowGraph) -> dict[Feature, float]:
    ranked = sorted(graph.nodes, key=lambda n: (n.feature != graph.seed, -n.score, str(n.feature)))
    weights = [max(float(n.score), 0.0) + 1e-6 for n in ranked]
    total, cum, out = sum(weights), 0.0, {}
    for n, w in zip(ranked, weights):
        cum += w
        out[n.feature] = min(cum / total, 1.0)
    return out


def _label(labels: dict, f: Feature, default: str) -> str:
    """``labels[f]`` as one string: a plain string, or ``labels.FeatureLabels``' label."""
    got = labels.get(f)
    return default if got is None else got if isinstance(got, str) else got.label


def graph_json(graph: FlowGraph, labels: dict | None = None, urls: dict | None = None) -> dict:
    """The flow graph as circuit-tracer's attribution-graph JSON (module docstring).
    ``labels`` / ``urls``: per feature, a label to use instead of the node's (a string or
    ``labels.FeatureLabels``) and a page link."""
    labels, urls = labels or {}, urls or {}
    influence = _influence(graph)
    nodes = []
    for n in graph.nodes:
        f = n.feature
        label = _label(labels, f, n.label)
        clerp = f"{f} {n.lineage or f.kind}" + (f": {label}" if label else "")
        node = {"node_id": node_id(f), "feature": feature_code(f), "layer": str(f.layer),
                "ctx_idx": COLUMNS[f.kind], "feature_type": "cross layer transcoder",
                "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
                "jsNodeId": f"{f.layer}_{f.index}-{COLUMNS[f.kind]}", "clerp": clerp,
                "influence": influence[f], "activation": None}
        if f in urls:
            node["vis_link"] = urls[f]
        nodes.append(node)
    for col, name in enumerate(COLUMN_NAMES):
        nodes.append({"node_id": f"E_{col}_{col}", "feature": col, "layer": "E", "ctx_idx": col,
                      "feature_type": "embedding", "jsNodeId": f"E_{col}-{col}", "clerp": "",
                      "influence": 0.0, "activation": None})
    top = max(graph.layers) + 1 if graph.nodes else 0
    nodes.append({"node_id": f"{top}_0_{COLUMNS['res']}", "feature": 0, "layer": str(top),
                  "ctx_idx": COLUMNS["res"], "feature_type": "logit", "token_prob": 0.0,
                  "is_target_logit": False, "jsNodeId": f"L_0-{COLUMNS['res']}",
                  "clerp": 'Output "readout" (p=0.000)', "influence": 0.0, "activation": None})
    links = [{"source": node_id(e.source), "target": node_id(e.target), "weight": e.cos}
             for e in graph.edges]
    model = graph.settings.get("model") or "unknown model"
    seed = str(graph.seed)
    meta = {"slug": f"saeflow-{seed.replace('/', '-')}", "scan": SCAN, "transcoder_list": [],
            "prompt_tokens": list(COLUMN_NAMES), "prompt": f"flow graph of {seed} ({model})",
            "node_threshold": 1.0, "schema_version": 1,
            "info": {"description": f"saeflow flow graph of {seed} in {model}: rows are layers, "
                                    "columns the site kinds, link weights decoder cosines",
                     "generator": {"name": "saeflow"}},
            "pruning_settings": {k: graph.settings[k] for k in ("res_threshold", "block_threshold")
                                 if isinstance(graph.settings.get(k), (int, float))}}
    return {"metadata": meta,
            "qParams": {"pinnedIds": [node_id(graph.seed)], "supernodes": [], "linkType": "both",
                        "clickedId": node_id(graph.seed), "sg_pos": ""},
            "nodes": nodes, "links": links}


def feature_file(f: Feature, label, tokens: list[str] | None = None) -> dict:
    """A feature file in the format circuit-tracer's frontend loads (no activation examples:
    a flow graph is computed from weights). Its logits row holds the label and then the
    promoted ``tokens`` (``label``: a string or ``labels.FeatureLabels``, whose promoted tokens
    are used)."""
    if not isinstance(label, str):
        tokens = [t for t in label.promotes.split(" · ") if t] if label.promotes else tokens
        label = label.label
    logits = ([label] if label else []) + [t for t in (tokens or []) if t != label]
    return {"transcoder_id": str(f.site), "index": feature_code(f), "examples_quantiles": [],
            "top_logits": logits, "bottom_logits": [], "act_min": 0.0,
            "act_max": 1.0, "quantile_values": [], "histogram": [], "activation_frequency": 0.0}


def write_graph_folder(graph: FlowGraph, folder: str | Path, labels: dict | None = None,
                       urls: dict | None = None) -> Path:
    """Write the graph where circuit-tracer's local server serves it from (module docstring);
    returns the graph file."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder}: the neuronpedia export writes a folder, and this is a file")
    data = graph_json(graph, labels, urls)
    meta = data["metadata"]
    path = folder / f"{meta['slug']}.json"
    write_json_atomic(path, data)
    for n in graph.nodes:
        write_json_atomic(folder / "features" / f"{feature_code(n.feature)}.json",
                          feature_file(n.feature, (labels or {}).get(n.feature, n.label)))
    index_path = folder / "graph-metadata.json"
    index = {"graphs": []}
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text())
            assert isinstance(index.get("graphs"), list)
        except (ValueError, AssertionError, AttributeError):
            raise ValueError(f"{index_path}: not a graph index ({{\"graphs\": [...]}})") from None
    index["graphs"] = [g for g in index["graphs"] if g.get("slug") != meta["slug"]] + [meta]
    write_json_atomic(index_path, index)
    return path


def relabel(graph: FlowGraph, labels: dict) -> FlowGraph:
    """The graph with each node's label replaced where ``labels`` has one."""
    return FlowGraph(graph.seed, [replace(n, label=labels.get(n.feature, n.label))
                                  for n in graph.nodes], graph.edges, dict(graph.settings))


# ---- explanations and ids ----------------------------------------------------------------
def explanation_dir(root: str | Path, model_id: str, source: str) -> Path:
    return Path(root) / "v1" / model_id / source / "explanations"


def read_explanations(root: str | Path, model_id: str, source: str) -> dict[int, str]:
    """``index -> description`` from Neuronpedia's export files of one source under ``root``
    (the folder that holds ``v1/``); empty when the source has no files there."""
    folder = explanation_dir(root, model_id, source)
    if not folder.is_dir():
        return {}
    batches = []
    for p in folder.iterdir():
        m = _BATCH_RE.fullmatch(p.name)
        if m:
            batches.append((int(m.group(1)), p))
    out: dict[int, str] = {}
    for _, path in sorted(batches):
        opener = gzip.open if path.suffix == ".gz" else open
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                        index = int(row["index"])
                        text = str(row["description"]).strip()
                    except (ValueError, KeyError, TypeError) as e:
                        raise ValueError(f"{path}: line {line_no} is not an explanation row "
                                         f"with index and description ({e})") from None
                    if text and index not in out:
                        out[index] = text
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: cannot read ({e})") from None
    return out


@dataclass
class NeuronpediaIds:
    """Where a suite's features live on Neuronpedia: one model id, one source per site."""
    model_id: str
    sources: dict[Site, str] = field(default_factory=dict)

    def feature_url(self, f: Feature) -> str | None:
        source = self.sources.get(f.site)
        return None if source is None else f"{NEURONPEDIA}/{self.model_id}/{source}/{f.index}"

    def urls(self, features) -> dict[Feature, str]:
        return {f: u for f in features if (u := self.feature_url(f))}

    def labels(self, root: str | Path, features=None) -> dict[Feature, str]:
        """Explanations of ``features`` (all the sources' rows when None) read under ``root``."""
        out: dict[Feature, str] = {}
        wanted = None if features is None else {Feature.parse(f) for f in features}
        for site, source in self.sources.items():
            if wanted is not None and not any(f.site == site for f in wanted):
                continue
            for index, text in read_explanations(root, self.model_id, source).items():
                f = Feature(site, index)
                if wanted is None or f in wanted:
                    out[f] = text
        return out

    @classmethod
    def of_suite(cls, suite) -> NeuronpediaIds | None:
        """The suite's Neuronpedia ids (module docstring), or None when it names none."""
        spec = (suite.info or {}).get("neuronpedia")
        if isinstance(spec, dict) and spec.get("model"):
            ids = cls(str(spec["model"]))
            pattern = spec.get("source")
            for site in suite.sites():
                given = (spec.get("sources") or {}).get(str(site))
                if given or pattern:
                    ids.sources[site] = (str(given) if given else
                                         str(pattern).format(layer=site.layer, kind=site.kind))
            return ids
        from saeflow.formats.saelens import CFG, read_json, saelens_config
        model, sources = None, {}
        for site in suite.sites():
            path = suite.paths.get(site)
            if path is None:  # in memory
                np_id = suite[site].metadata.get("neuronpedia_id")
            elif (Path(path) / CFG).is_file():  # the config alone: no weights read
                np_id = saelens_config(read_json(Path(path) / CFG), path).get("neuronpedia_id")
            else:
                continue
            if not isinstance(np_id, str) or np_id.count("/") != 1:
                continue
            m, source = np_id.split("/")
            if model not in (None, m):
                raise ValueError(f"suite {suite.name!r}: its SAEs name two Neuronpedia models, "
                                 f"{model} and {m}")
            model, sources[site] = m, source
        return cls(model, sources) if model else None


def ids_of_atlas(atlas) -> NeuronpediaIds | None:
    """The Neuronpedia ids of the suite an atlas was computed from, when that suite is on this
    machine and names them."""
    from saeflow.suite import atlas_suite_root
    from saeflow.suite import read_suite
    root = atlas_suite_root(atlas)
    return None if root is None else NeuronpediaIds.of_suite(read_suite(root))
