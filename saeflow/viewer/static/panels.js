/* Panels of the saeflow viewer that sit beside the main drawings (plain SVG and DOM):
   - shareCurves: lineage class shares as one threshold sweeps a grid (/api/share_curves),
     per layer, with the layer's thresholds and nulls marked;
   - permutationChain: a residual feature's permutation chain (/api/permutation/ID), the
     one-to-one matches composed over depth, beside its cosine flow graph. */
"use strict";
(function () {
  const D = window.SFDraw, el = D.el;
  const KINDS = { res: "s(R)", mlp: "s(M)", att: "s(A)" };
  const DASH = { res: "", mlp: "6 3", att: "2 3" };

  /* an HTML element: attributes (on* are listeners; false/null are left out) and children */
  function h(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v == null || v === false) continue;
      if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else if (k === "html") throw new Error("no raw html");
      else e.setAttribute(k, v === true ? "" : v);
    }
    for (const k of kids.flat()) if (k != null) e.append(k instanceof Node ? k : String(k));
    return e;
  }
  const fmt = (x, d = 3) => (x == null || Number.isNaN(x)) ? "–" : Number(x).toFixed(d);

  /* curves: the /api/share_curves answer; draws the classes of one layer */
  function drawCurves(container, curves, layer) {
    container.textContent = "";
    const per = curves.layers[String(layer)];
    if (!per) { container.textContent = "no scores at layer " + layer; return null; }
    const xs = curves.grid;
    const W = Math.max(420, Math.min(900, (container.clientWidth || 700) - 8)), H = 260, padL = 44, padR = 150, padB = 34, padT = 10;
    const X = x => padL + x * (W - padL - padR), Y = f => padT + (1 - f) * (H - padT - padB);
    const svg = el("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, "data-testid": "share-curves", "data-layer": layer });
    el("rect", { x: 0, y: 0, width: W, height: H, fill: "#fff" }, svg);
    for (const f of [0, 0.25, 0.5, 0.75, 1]) {
      el("line", { x1: padL, x2: W - padR, y1: Y(f), y2: Y(f), stroke: "#e5e7eb" }, svg);
      el("text", { x: padL - 6, y: Y(f) + 4, "font-size": 11, "text-anchor": "end", fill: "#6b7280" }, svg).textContent = Math.round(100 * f) + "%";
    }
    for (const x of [0, 0.2, 0.4, 0.6, 0.8, 1])
      el("text", { x: X(x), y: H - padB + 14, "font-size": 10.5, "text-anchor": "middle", fill: "#6b7280" }, svg).textContent = x.toFixed(1);
    el("text", { x: X(0.5), y: H - 4, "font-size": 11, "text-anchor": "middle", fill: "#6b7280" }, svg).textContent =
      curves.vary === "all" ? "threshold applied to s(R), s(M) and s(A)" : `threshold on ${KINDS[curves.vary]} (the others at the atlas's)`;
    // the layer's own thresholds (black) and null quantiles (grey) of the varied scores
    const kinds = curves.vary === "all" ? Object.keys(KINDS) : [curves.vary];
    const th = (curves.thresholds || {})[String(layer)] || {}, nu = (curves.null_thresholds || {})[String(layer)] || {};
    for (const k of kinds) for (const [src, color, what] of [[th, "#111827", "threshold"], [nu, "#9ca3af", "null"]]) {
      if (src[k] == null) continue;
      const ln = el("line", { x1: X(src[k]), x2: X(src[k]), y1: padT, y2: H - padB, stroke: color, "stroke-dasharray": DASH[k],
        "data-mark": `${what}-${k}` }, svg);
      ln.addEventListener("mousemove", ev => D.showTip(ev, `${KINDS[k]} ${what} ${fmt(src[k])}`));
      ln.addEventListener("mouseleave", D.hideTip);
    }
    let row = 0;
    for (const c of curves.classes) {
      const ys = per[c];
      if (!ys || !ys.some(v => v > 0)) continue;
      const d = ys.map((v, i) => `${i ? "L" : "M"}${X(xs[i]).toFixed(1)},${Y(v).toFixed(1)}`).join(" ");
      const p = el("path", { d, fill: "none", stroke: D.COLORS[c] || "#999", "stroke-width": 2.2, "data-class": c }, svg);
      p.addEventListener("mousemove", ev => {
        const i = Math.max(0, Math.min(xs.length - 1, Math.round((ev.offsetX - padL) / (W - padL - padR) * (xs.length - 1))));
        D.showTip(ev, `layer ${layer}, ${c}\nthreshold ${xs[i].toFixed(2)}: ${(100 * ys[i]).toFixed(1)}%`);
      });
      p.addEventListener("mouseleave", D.hideTip);
      el("rect", { x: W - padR + 12, y: padT + 4 + row * 17, width: 12, height: 3, fill: D.COLORS[c] || "#999" }, svg);
      el("text", { x: W - padR + 30, y: padT + 9 + row * 17, "font-size": 11, fill: "#374151" }, svg).textContent = c.replaceAll("_", " ");
      row++;
    }
    container.appendChild(svg);
    return svg;
  }

  /* the overview card: vary and layer selectors over drawCurves */
  function shareCurves(o, api) {
    const layers = o.layers.filter(l => o.class_fractions[String(l)]);
    const withPrev = layers.filter(l => !(o.no_previous || []).includes(l));
    const start = (withPrev.length ? withPrev : layers)[Math.floor((withPrev.length || layers.length) / 2)];
    const vary = h("select", { name: "vary" }, [["all", "all three scores"], ["res", "s(R) only"], ["mlp", "s(M) only"], ["att", "s(A) only"]]
      .map(([v, t]) => h("option", { value: v }, t)));
    const layer = h("select", { name: "curve_layer" }, layers.map(l => h("option", { value: l, selected: l === start }, String(l))));
    const box = h("div", { class: "scroll" });
    const status = h("span", { class: "muted" });
    const cache = {};
    const draw = async () => {
      try {
        status.textContent = "";
        cache[vary.value] = cache[vary.value] || await api("share_curves?vary=" + vary.value);
        drawCurves(box, cache[vary.value], +layer.value);
      } catch (e) { status.textContent = String(e.message || e); }
    };
    vary.addEventListener("change", draw); layer.addEventListener("change", draw);
    draw();
    return h("div", { class: "card", "data-testid": "share-card" },
      h("h2", { style: "margin-top:0" }, "Class shares over a threshold grid"),
      h("p", { class: "muted" }, "How the classes of one layer change as the threshold that makes a score “high” sweeps 0–1, " +
        "from the stored raw scores. Vertical lines: the layer's thresholds (black) and null quantiles (grey); solid s(R), dashed s(M), dotted s(A)."),
      h("div", { class: "controls" }, h("label", {}, "vary", vary), h("label", {}, "layer", layer), status), box);
  }

  /* the graph page's card: the chain of `id`; update(ids) marks the nodes of the cosine graph */
  function permutationChain(id, api) {
    const box = h("div", { class: "card", "data-testid": "perm-chain" },
      h("h2", { style: "margin-top:0" }, "Permutation chain"),
      h("p", { class: "muted" }, "One-to-one matches of consecutive residual SAEs (Mechanistic Permutability), composed over depth. " +
        "cos: the atlas's cosine when the partner is among its top matches; “graph”: the node is in the cosine flow graph."));
    const body = h("div", {}, h("p", { class: "muted" }, "loading…"));
    box.append(body);
    let inGraph = new Set(), rows = [];
    const mark = () => { for (const [tr, nid] of rows) tr.classList.toggle("in-graph", inGraph.has(nid)); };
    api("permutation/" + id.split("/").map(encodeURIComponent).join("/")).then(r => {
      body.textContent = "";
      if (r.reason) body.append(h("p", { class: r.available ? "warn" : "muted", "data-testid": "perm-reason" }, r.reason));
      if (!r.chain.length) return;
      const pairs = Object.fromEntries((r.pairs || []).map(p => [p.b, p]));
      const tbody = h("tbody");
      rows = r.chain.map(x => {
        const p = pairs[x.id.split("/").slice(0, 2).join("/")];
        const tr = h("tr", { "data-id": x.id, class: x.id === id ? "seed" : null },
          h("td", { class: "num" }, x.layer), h("td", {}, h("a", { href: "#/feature/" + x.id, class: "mono" }, x.id)),
          h("td", { class: "num" }, fmt(x.cos)), h("td", {}, x.top1 ? "top-1" : x.rank ? "top-" + x.rank : x.top1 === null ? "" : "—"),
          h("td", { class: "graph-mark" }), h("td", { class: "label" }, x.label || ""),
          h("td", { class: "num muted", title: "mean cosine of this layer pair's matched decoder rows" }, p ? fmt(p.mean_cos, 2) : ""));
        tbody.append(tr);
        return [tr, x.id];
      });
      body.append(h("div", { class: "scroll" }, h("table", { class: "compact" },
        h("thead", {}, h("tr", {}, ["layer", "feature", "cos", "match", "graph", "label", "pair cos"].map(t => h("th", {}, t)))), tbody)),
        h("p", { class: "muted" }, `${r.config.objective}, ${r.config.fold ? "folded" : "raw"} weights; from ${r.folder}`));
      mark();
    }).catch(e => { body.textContent = String(e.message || e); });
    return { element: box, update(ids) { inGraph = new Set(ids); mark(); } };
  }

  window.SFPanels = { h, drawCurves, shareCurves, permutationChain };
})();
