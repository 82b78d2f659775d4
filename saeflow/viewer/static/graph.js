/* Drawing for the saeflow viewer, in plain SVG (no library, works offline):
   - drawFlow: a flow graph at the positions the API sends (saeflow.layout, the layout the
     SVG/PNG export uses too), with pan (drag) and zoom (wheel, buttons) for large graphs;
   - drawLineage: lineage-class fractions per layer as stacked bars. */
"use strict";
(function () {
  const NS = "http://www.w3.org/2000/svg";
  // saeflow.lineage.COLORS (the overview sends them too)
  const COLORS = {
    translated: "#4c78a8", processed_mlp: "#72b7b2", processed_att: "#9ecae9",
    processed_both: "#54a24b", newborn_mlp: "#f58518", newborn_att: "#e45756",
    newborn_both: "#b279a2", unexplained: "#bab0ac", no_prev_mlp: "#fdbf6f",
    no_prev_att: "#fb9a99", no_prev_both: "#cab2d6", no_prev_unexplained: "#d9d9d9",
  };
  // block nodes (mlp / attention) are squares; the overview sends saeflow.layout's colours
  const KIND_COLORS = { res: "#4c78a8", mlp: "#f58518", att: "#e45756" };

  function el(name, attrs, parent) {
    const e = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (parent) parent.appendChild(e);
    return e;
  }
  function colorOf(node) {
    if (node.kind !== "res") return KIND_COLORS[node.kind === "att_z" ? "att" : node.kind] || "#888";
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
             edges: [{source, target, cos}],
             layout: {positions: {id: [x, y]}, layers, lanes: [{kind, top, rows}], width, height}}
     (x in columns, y in rows, from saeflow.layout)
     opts: {onClick(node, evt), picked: Set of ids} -> the <svg> element */
  function drawFlow(container, graph, opts) {
    opts = opts || {};
    container.textContent = "";
    const nodes = graph.nodes.slice();
    if (!nodes.length) { container.textContent = "empty graph"; return null; }
    const lay = graph.layout;
    const room = (container.clientWidth || 1200) - 64 - 24;
    const colW = Math.max(96, Math.min(150, Math.floor(room / Math.max(1, lay.width))));
    const rowH = 54, padL = 64, padT = 42;
    const X = x => padL + x * colW, Y = y => padT + y * rowH;
    const pos = new Map(Object.entries(lay.positions).map(([id, [x, y]]) => [id, { x: X(x), y: Y(y) }]));
    const width = Math.ceil(X(lay.width) + 20), height = Math.ceil(Y(lay.height) + 24);
    // the drawing keeps its natural scale (labels readable); a larger graph pans and zooms
    const W = Math.min(width, Math.max(320, room + 88)), H = Math.min(height, 640);
    const svg = el("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, "data-testid": "flow-graph", class: "pannable" });
    const world = el("g", { class: "world" }, svg);
    el("rect", { x: 0, y: 0, width, height, fill: "#fff" }, world);
    for (const ln of lay.lanes) {
      el("rect", { x: padL - 6, y: Y(ln.top) - 6, width: width - padL - 8, height: ln.rows * rowH + 12,
        fill: ln.kind === "res" ? "#f3f6fa" : "#fafafa", rx: 6, "data-lane": ln.kind }, world);
      const t = el("text", { x: 10, y: Y(ln.top + ln.rows / 2) + 4, "font-size": 12, fill: "#6b7280" }, world);
      t.textContent = ln.kind;
    }
    lay.layers.forEach((l, i) => {
      const t = el("text", { x: X(i + 0.5), y: 22, "font-size": 12, fill: "#6b7280", "text-anchor": "middle" }, world);
      t.textContent = "L" + l;
    });
    const gE = el("g", {}, world);
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
    const gN = el("g", {}, world);
    for (const n of nodes) {
      const p = pos.get(n.id);
      if (!p) continue;
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
    const zoom = panZoom(svg, { W, H, width, height });
    const bar = document.createElement("div");
    bar.className = "zoombar";
    for (const [label, title, act] of [["+", "zoom in", () => zoom.by(1 / 1.25)], ["−", "zoom out", () => zoom.by(1.25)],
      ["fit", "whole graph", () => zoom.fit()], ["1:1", "natural size", () => zoom.reset()]]) {
      const b = document.createElement("button");
      b.type = "button"; b.className = "secondary"; b.textContent = label; b.title = title;
      b.dataset.zoom = label; b.addEventListener("click", act);
      bar.appendChild(b);
    }
    const hint = document.createElement("span");
    hint.className = "muted"; hint.textContent = "drag to pan, wheel to zoom";
    bar.appendChild(hint);
    container.appendChild(bar);
    container.appendChild(svg);
    return svg;
  }

  /* Pan and zoom an <svg> of pixel size W x H over a drawing of size width x height by moving
     its viewBox: drag the background to pan, the wheel zooms around the pointer. */
  function panZoom(svg, s) {
    let v = { x: 0, y: 0, w: s.W, h: s.H };
    const apply = () => svg.setAttribute("viewBox", `${v.x} ${v.y} ${v.w} ${v.h}`);
    const clamp = () => {
      v.w = Math.max(s.W / 8, Math.min(v.w, Math.max(s.width, s.height * s.W / s.H) * 1.05));
      v.h = v.w * s.H / s.W;
      v.x = Math.max(-v.w / 2, Math.min(v.x, s.width - v.w / 2));
      v.y = Math.max(-v.h / 2, Math.min(v.y, s.height - v.h / 2));
    };
    const by = (k, cx, cy) => {
      cx = cx == null ? v.x + v.w / 2 : cx; cy = cy == null ? v.y + v.h / 2 : cy;
      v = { x: cx - (cx - v.x) * k, y: cy - (cy - v.y) * k, w: v.w * k, h: v.h * k };
      clamp(); apply();
    };
    const point = ev => {
      const r = svg.getBoundingClientRect();
      return [v.x + (ev.clientX - r.left) / r.width * v.w, v.y + (ev.clientY - r.top) / r.height * v.h];
    };
    svg.addEventListener("wheel", ev => {
      ev.preventDefault();
      const [cx, cy] = point(ev);
      by(ev.deltaY < 0 ? 1 / 1.15 : 1.15, cx, cy);
    }, { passive: false });
    let drag = null;
    svg.addEventListener("pointerdown", ev => {
      if (ev.button !== 0 || ev.target.closest("g.node")) return;
      drag = { x: ev.clientX, y: ev.clientY, v: { ...v } };
      svg.setPointerCapture(ev.pointerId);
      svg.classList.add("dragging");
    });
    svg.addEventListener("pointermove", ev => {
      if (!drag) return;
      const r = svg.getBoundingClientRect();
      v.x = drag.v.x - (ev.clientX - drag.x) / r.width * v.w;
      v.y = drag.v.y - (ev.clientY - drag.y) / r.height * v.h;
      clamp(); apply();
    });
    const end = () => { drag = null; svg.classList.remove("dragging"); };
    svg.addEventListener("pointerup", end);
    svg.addEventListener("pointercancel", end);
    return {
      by,
      fit: () => { const k = Math.max(s.width / s.W, s.height / s.H); v = { x: 0, y: 0, w: s.W * k, h: s.H * k }; apply(); },
      reset: () => { v = { x: 0, y: 0, w: s.W, h: s.H }; apply(); },
      view: () => ({ ...v }),
    };
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
    for (const c of classes) item(COLORS[c] || "#999", c.replaceAll("_", " "), !withKinds);
    if (withKinds) { item(KIND_COLORS.mlp, "MLP feature", true); item(KIND_COLORS.att, "attention feature", true); }
    return div;
  }

  window.SFDraw = { COLORS, KIND_COLORS, el, drawFlow, drawLineage, legend, showTip, hideTip, textOn };
})();
