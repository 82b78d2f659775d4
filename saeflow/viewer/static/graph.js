/* Drawing for the saeflow viewer, in plain SVG (no library, works offline):
   - drawFlow: a flow graph as a layered layout, layers across, sites as lanes;
   - drawLineage: lineage-class fractions per layer as stacked bars. */
"use strict";
(function () {
  const NS = "http://www.w3.org/2000/svg";
  const COLORS = {
    translated: "#4e79a7", processed_mlp: "#59a14f", processed_att: "#edc948",
    processed_both: "#b07aa1", newborn_mlp: "#e15759", newborn_att: "#f28e2b",
    newborn_both: "#ff9da7", unexplained: "#bab0ac",
  };
  // block nodes (mlp / attention) are squares in the colours saeflow.export uses
  const KIND_COLORS = { res: "#4c78a8", mlp: "#f58518", att: "#e45756", att_z: "#e45756" };
  const LANES = ["att", "att_z", "res", "mlp"];  // top to bottom

  function el(name, attrs, parent) {
    const e = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (parent) parent.appendChild(e);
    return e;
  }
  function colorOf(node) {
    if (node.kind !== "res") return KIND_COLORS[node.kind] || "#888";
    return (node.lineage && COLORS[node.lineage]) || KIND_COLORS.res;
  }
  function textOn(hex) {  // black or white text, whichever reads better on the colour
    const v = parseInt(hex.slice(1), 16), r = v >> 16 & 255, g = v >> 8 & 255, b = v & 255;
    return 0.299 * r + 0.587 * g + 0.114 * b > 150 ? "#111" : "#fff";
  }
  function short(label, n) {
    const s = (label || "").split(" · ").slice(0, 2).join("·");
    return s.length > n ? s.slice(0, n - 1) + "…" : s;
  }
  function tooltip() { return document.getElementById("tooltip"); }
  function showTip(evt, text) {
    const t = tooltip(); if (!t) return;
    t.textContent = text; t.hidden = false;
    t.style.left = Math.min(evt.clientX + 14, window.innerWidth - 300) + "px";
    t.style.top = (evt.clientY + 14) + "px";
  }
  function hideTip() { const t = tooltip(); if (t) t.hidden = true; }

  /* graph: {seed, nodes: [{id, layer, kind, index, lineage, label, score}],
             edges: [{source, target, cos}]}
     opts: {onClick(node, evt), picked: Set of ids} -> the <svg> element */
  function drawFlow(container, graph, opts) {
    opts = opts || {};
    container.textContent = "";
    const nodes = graph.nodes.slice();
    if (!nodes.length) { container.textContent = "empty graph"; return null; }
    const layers = [...new Set(nodes.map(n => n.layer))].sort((a, b) => a - b);
    const lanes = LANES.filter(k => nodes.some(n => n.kind === k));
    const nCols = new Set(nodes.map(n => n.layer)).size;
    const room = (container.clientWidth || 1200) - 64 - 24;
    const colW = Math.max(96, Math.min(150, Math.floor(room / Math.max(1, nCols))));
    const rowH = 54, padL = 64, padT = 42, laneGap = 18;
    // cells: (layer, kind) -> nodes; order in a cell by barycentre of predecessors
    const byId = new Map(nodes.map(n => [n.id, n]));
    const preds = new Map(nodes.map(n => [n.id, []]));
    for (const e of graph.edges) if (preds.has(e.target) && byId.has(e.source)) preds.get(e.target).push(e.source);
    const cells = new Map();
    for (const n of nodes) {
      const key = n.layer + "|" + n.kind;
      if (!cells.has(key)) cells.set(key, []);
      cells.get(key).push(n);
    }
    const laneSize = {};
    for (const k of lanes) laneSize[k] = Math.max(...layers.map(l => (cells.get(l + "|" + k) || []).length), 1);
    const laneTop = {}; let y = padT;
    for (const k of lanes) { laneTop[k] = y; y += laneSize[k] * rowH + laneGap; }
    const height = y + 10;
    const xOf = n => padL + (layers.indexOf(n.layer) + (n.kind === "res" ? 0.62 : 0.18)) * colW;
    const pos = new Map();
    for (const l of layers) {
      for (const k of lanes) {
        const cell = cells.get(l + "|" + k) || [];
        const bary = n => {
          const ys = preds.get(n.id).map(p => pos.get(p)).filter(Boolean).map(p => p.y);
          return ys.length ? ys.reduce((a, b) => a + b, 0) / ys.length : (n.id === graph.seed ? -1 : 1e9);
        };
        cell.sort((a, b) => bary(a) - bary(b) || a.index - b.index);
        const off = (laneSize[k] - cell.length) * rowH / 2;
        cell.forEach((n, i) => pos.set(n.id, { x: xOf(n), y: laneTop[k] + off + i * rowH + rowH / 2 }));
      }
    }
    const width = padL + layers.length * colW + 20;
    const svg = el("svg", { width, height, viewBox: `0 0 ${width} ${height}`, "data-testid": "flow-graph" });
    el("rect", { x: 0, y: 0, width, height, fill: "#fff" }, svg);
    // lanes and layer axis
    for (const k of lanes) {
      el("rect", { x: padL - 6, y: laneTop[k] - 6, width: width - padL - 8, height: laneSize[k] * rowH + 12,
        fill: k === "res" ? "#f3f6fa" : "#fafafa", rx: 6 }, svg);
      const t = el("text", { x: 10, y: laneTop[k] + laneSize[k] * rowH / 2 + 4, "font-size": 12, fill: "#6b7280" }, svg);
      t.textContent = k;
    }
    layers.forEach((l, i) => {
      const t = el("text", { x: padL + (i + 0.62) * colW, y: 22, "font-size": 12, fill: "#6b7280", "text-anchor": "middle" }, svg);
      t.textContent = "L" + l;
    });
    // edges
    const gE = el("g", {}, svg);
    for (const e of graph.edges) {
      const a = pos.get(e.source), b = pos.get(e.target);
      if (!a || !b) continue;
      const c = Math.max(0, Math.min(1, e.cos));
      const mx = (a.x + b.x) / 2;
      const p = el("path", { class: "edge", d: `M${a.x},${a.y} C${mx},${a.y} ${mx},${b.y} ${b.x},${b.y}`,
        stroke: "#5b6472", "stroke-width": (0.6 + 4.5 * c * c).toFixed(2), "stroke-opacity": (0.25 + 0.65 * c).toFixed(2) }, gE);
      p.addEventListener("mousemove", ev => showTip(ev, `${e.source} → ${e.target}\ncos ${e.cos.toFixed(3)}`));
      p.addEventListener("mouseleave", hideTip);
    }
    // nodes
    const gN = el("g", {}, svg);
    for (const n of nodes) {
      const p = pos.get(n.id);
      const g = el("g", { class: "node" + (opts.picked && opts.picked.has(n.id) ? " picked" : ""),
        transform: `translate(${p.x},${p.y})`, "data-id": n.id, tabindex: 0 }, gN);
      const r = n.id === graph.seed ? 11 : 8;
      if (n.id === graph.seed) el("circle", { r: r + 4, fill: "none", stroke: "#1f2a37", "stroke-width": 2 }, g);
      if (n.kind === "res") el("circle", { class: "shape", r, fill: colorOf(n), stroke: "#fff", "stroke-width": 1.5 }, g);
      else el("rect", { class: "shape", x: -r, y: -r, width: 2 * r, height: 2 * r, rx: 2, fill: colorOf(n), stroke: "#fff", "stroke-width": 1.5 }, g);
      const t = el("text", { y: r + 12, "font-size": 10.5, "text-anchor": "middle", fill: "#374151" }, g);
      t.textContent = n.kind + "/" + n.index;
      const lab = short(n.label, 20);
      if (lab) { const t2 = el("text", { y: r + 24, "font-size": 9.5, "text-anchor": "middle", fill: "#6b7280" }, g); t2.textContent = lab; }
      const tip = `${n.id}  ${n.lineage || n.kind}\n${n.label || ""}` + (n.score != null ? `\nscore ${Number(n.score).toFixed(3)}` : "");
      g.addEventListener("mousemove", ev => showTip(ev, tip));
      g.addEventListener("mouseleave", hideTip);
      g.addEventListener("click", ev => { hideTip(); if (opts.onClick) opts.onClick(n, ev, g); });
      g.addEventListener("keydown", ev => { if (ev.key === "Enter" && opts.onClick) opts.onClick(n, ev, g); });
    }
    container.appendChild(svg);
    return svg;
  }

  /* fractions: {layer: {class: fraction}}; classes: ordered names */
  function drawLineage(container, fractions, classes, onClick) {
    container.textContent = "";
    const layers = Object.keys(fractions).map(Number).sort((a, b) => a - b);
    if (!layers.length) { container.textContent = "no residual layers with lineage classes"; return null; }
    const W = Math.max(520, Math.min(1400, (container.clientWidth || 800) - 8)), H = 260, padL = 44, padB = 30, padT = 10;
    const bw = (W - padL - 10) / layers.length;
    const svg = el("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, "data-testid": "lineage-chart" });
    el("rect", { x: 0, y: 0, width: W, height: H, fill: "#fff" }, svg);
    const yOf = f => padT + (1 - f) * (H - padT - padB);
    for (const f of [0, 0.25, 0.5, 0.75, 1]) {
      el("line", { x1: padL, x2: W - 10, y1: yOf(f), y2: yOf(f), stroke: "#e5e7eb" }, svg);
      const t = el("text", { x: padL - 6, y: yOf(f) + 4, "font-size": 11, "text-anchor": "end", fill: "#6b7280" }, svg);
      t.textContent = Math.round(f * 100) + "%";
    }
    layers.forEach((l, i) => {
      let acc = 0;
      const fr = fractions[l];
      for (const c of classes) {
        const v = fr[c] || 0;
        if (v <= 0) continue;
        const r = el("rect", { class: "bar", x: padL + i * bw + 1, width: Math.max(1, bw - 2), y: yOf(acc + v), height: yOf(acc) - yOf(acc + v),
          fill: COLORS[c] || "#999", "data-layer": l, "data-class": c }, svg);
        if (onClick) r.addEventListener("click", () => { hideTip(); onClick(l, c); });
        r.addEventListener("mousemove", ev => showTip(ev, `layer ${l}\n${c}: ${(100 * v).toFixed(1)}%`));
        r.addEventListener("mouseleave", hideTip);
        acc += v;
      }
      if (layers.length <= 40 || i % 2 === 0) {
        const t = el("text", { x: padL + (i + 0.5) * bw, y: H - padB + 14, "font-size": 10.5, "text-anchor": "middle", fill: "#6b7280" }, svg);
        t.textContent = l;
      }
    });
    const t = el("text", { x: padL + (W - padL) / 2, y: H - 3, "font-size": 11, "text-anchor": "middle", fill: "#6b7280" }, svg);
    t.textContent = "layer";
    container.appendChild(svg);
    return svg;
  }

  function legend(classes, withKinds) {
    const div = document.createElement("div");
    div.className = "legend";
    const item = (color, text, square) => {
      const s = document.createElement("span");
      const sw = document.createElement("span");
      sw.className = "sw" + (square ? " square" : ""); sw.style.background = color;
      s.appendChild(sw); s.appendChild(document.createTextNode(text));
      div.appendChild(s);
    };
    for (const c of classes) item(COLORS[c] || "#999", c.replace("_", " "), !withKinds);
    if (withKinds) { item(KIND_COLORS.mlp, "MLP feature", true); item(KIND_COLORS.att, "attention feature", true); }
    return div;
  }

  window.SFDraw = { COLORS, drawFlow, drawLineage, legend, hideTip, textOn };
})();
