/* The saeflow viewer's pages: a hash router over the JSON API (see docs/viewer.md). */
"use strict";
(function () {
  const app = document.getElementById("app");
  const D = window.SFDraw, P = window.SFPanels;
  const state = { overview: null, picked: new Set(), pickSeed: null };

  // ---- helpers ------------------------------------------------------------------------
  const h = P.h;
  async function api(path, options) {
    const r = await fetch("/api/" + path, options);
    let body;
    try { body = await r.json(); } catch (e) { body = { error: r.statusText }; }
    if (!r.ok) throw new Error(body.error || ("HTTP " + r.status));
    return body;
  }
  const enc = id => id.split("/").map(encodeURIComponent).join("/");
  const fmt = (x, d = 3) => (x == null || Number.isNaN(x)) ? "–" : Number(x).toFixed(d);
  function badge(lineage) {
    if (!lineage) return h("span", { class: "badge", style: "background:#e5e7eb" }, "—");
    const bg = D.COLORS[lineage] || "#dddddd";
    return h("span", { class: "badge", style: `background:${bg};color:${D.textOn(bg)}` }, lineage.replaceAll("_", " "));
  }
  const oneLine = t => (t || "").replace(/\s*\n+\s*/g, " ↵ ");
  const featLink = (id, text) => h("a", { href: "#/feature/" + id, class: "mono" }, text || id);
  function params(q) { return new URLSearchParams(q || ""); }
  function setNav(name) {
    document.querySelectorAll("header nav a").forEach(a => a.classList.toggle("active", a.dataset.nav === name));
  }
  function fail(err) {
    app.textContent = "";
    app.append(h("div", { class: "card error", "data-testid": "error" }, String(err.message || err)));
  }
  async function overview() {
    if (!state.overview) {
      state.overview = await api("overview");
      Object.assign(D.COLORS, state.overview.colors || {});
      Object.assign(D.KIND_COLORS, state.overview.kind_colors || {});
    }
    return state.overview;
  }
  function facts(pairs) {
    const dl = h("dl", { class: "facts" });
    for (const [k, v] of pairs) if (v != null && v !== "") dl.append(h("dt", {}, k), h("dd", {}, v));
    return dl;
  }

  // ---- overview -----------------------------------------------------------------------
  async function pageOverview() {
    setNav("overview");
    const o = await overview();
    app.textContent = "";
    app.append(h("h1", {}, o.name));
    const kinds = Object.entries(o.site_counts).map(([k, n]) => `${n} × ${k}`).join(", ");
    const widths = [...new Set(Object.values(o.widths))].join(", ");
    app.append(h("div", { class: "grid" },
      h("div", { class: "card" }, h("h2", { style: "margin-top:0" }, "Suite"), facts([
        ["model", o.model || "—"], ["layers", `${o.layers.length} (${o.layers[0]}–${o.layers[o.layers.length - 1]})`],
        ["sites", kinds], ["widths", widths], ["features", o.n_features.toLocaleString()],
        ["contexts", o.contexts ? `${o.contexts.n_sequences} sequences${o.contexts.complete ? "" : " (partial)"}` : "not computed (saeflow contexts)"],
        ["steering", o.steering.available ? (o.steering.model_loaded ? "model loaded" : "model loads on first request") : "off: " + o.steering.reason],
      ])),
      h("div", { class: "card" }, h("h2", { style: "margin-top:0" }, "Atlas settings"),
        facts(Object.entries(o.settings).map(([k, v]) => [k, typeof v === "object" ? JSON.stringify(v) : String(v)])))));
    const chart = h("div", { class: "scroll" });
    const noPrev = o.no_previous || [];
    app.append(h("div", { class: "card" }, h("h2", { style: "margin-top:0" }, "Lineage classes over depth"),
      h("p", { class: "muted" }, "Fraction of each layer's residual features per class; click a bar to list those features."),
      noPrev.length ? h("p", { class: "muted", "data-testid": "no-previous" }, `Layer${noPrev.length > 1 ? "s" : ""} ${noPrev.join(", ")} ` +
        "ha" + (noPrev.length > 1 ? "ve" : "s") + " no previous residual layer, so s(R) cannot be tested there: its classes are no_prev_*, not newborn.") : null,
      D.legend(o.classes), chart));
    D.drawLineage(chart, o.class_fractions, o.classes,
      (layer, cls) => { location.hash = `#/search?layer=${layer}&kind=res&lineage=${cls}`; });
    app.append(P.shareCurves(o, api));
    if (o.quality && o.quality.summary) app.append(h("div", { class: "card scroll", "data-testid": "quality" },
      h("h2", { style: "margin-top:0" }, "SAE quality (held-out text, median per kind)"), qualityTable(o.quality.summary),
      o.quality.sites ? h("details", {}, h("summary", {}, "per site"), qualityTable(o.quality.sites)) : null));
    const rows = Object.entries(o.thresholds).sort((a, b) => +a[0] - +b[0]);
    if (rows.length) {
      const cols = [...new Set(rows.flatMap(([, t]) => Object.keys(t)))];
      app.append(h("div", { class: "card scroll" }, h("h2", { style: "margin-top:0" }, "Per-layer thresholds"),
        h("p", { class: "muted" }, o.threshold_rule || ""),
        h("table", { "data-testid": "thresholds", class: "compact" },
          h("thead", {}, h("tr", {}, h("th", {}, "layer"), cols.map(c => h("th", { class: "num" }, "s(" + c + ")")), h("th", {}, ""))),
          h("tbody", {}, rows.map(([l, t]) => h("tr", {}, h("td", {}, l),
            cols.map(c => h("td", { class: "num" }, fmt(t[c]))),
            h("td", {}, h("a", { href: `#/search?layer=${l}&kind=res` }, "features"))))))));
    }
  }
  function qualityTable(q) {
    // {site: {metric: value}} or {metric: value}
    const entries = Object.entries(q);
    if (entries.every(([, v]) => v && typeof v === "object")) {
      const metrics = [...new Set(entries.flatMap(([, v]) => Object.keys(v)))];
      return h("div", { class: "scroll" }, h("table", {},
        h("thead", {}, h("tr", {}, h("th", {}, "site"), metrics.map(m => h("th", { class: "num" }, m)))),
        h("tbody", {}, entries.map(([s, v]) => h("tr", {}, h("td", { class: "mono" }, s),
          metrics.map(m => h("td", { class: "num" }, typeof v[m] === "number" ? (Number.isInteger(v[m]) ? String(v[m]) : fmt(v[m])) : String(v[m] ?? "–"))))))));
    }
    return facts(entries.map(([k, v]) => [k, typeof v === "object" ? JSON.stringify(v) : String(v)]));
  }

  // ---- search -------------------------------------------------------------------------
  async function pageSearch(q) {
    setNav("search");
    const o = await overview();
    const p = params(q);
    const limit = 50, offset = +(p.get("offset") || 0);
    const sel = (name, values, cur) => h("select", { name },
      h("option", { value: "" }, "any"), values.map(v => h("option", { value: v, selected: String(v) === cur }, String(v))));
    const form = h("form", { class: "inline card", "data-testid": "search-form" },
      h("label", {}, "text or id", h("input", { type: "search", name: "q", value: p.get("q") || "", size: 28, placeholder: "12/res/4111, a token, a word" })),
      h("label", {}, "lineage", sel("lineage", o.classes, p.get("lineage") || "")),
      h("label", {}, "layer", sel("layer", o.layers, p.get("layer") || "")),
      h("label", {}, "kind", sel("kind", o.kinds, p.get("kind") || "")),
      h("button", { type: "submit" }, "Search"));
    form.addEventListener("submit", ev => {
      ev.preventDefault();
      const f = new FormData(form), out = new URLSearchParams();
      for (const [k, v] of f) if (v) out.set(k, v);
      location.hash = "#/search?" + out.toString();
    });
    app.textContent = "";
    app.append(h("h1", {}, "Features"), form);
    const api_q = new URLSearchParams(p); api_q.set("limit", limit); api_q.set("offset", offset);
    const res = await api("search?" + api_q.toString());
    const table = h("table", { "data-testid": "results" },
      h("thead", {}, h("tr", {}, h("th", {}, "feature"), h("th", {}, "lineage"), h("th", {}, "label"), h("th", {}, "matched by"))),
      h("tbody", {}, res.results.map(r => h("tr", {}, h("td", {}, featLink(r.id)), h("td", {}, badge(r.lineage)),
        h("td", { class: "label" }, r.label || ""),
        h("td", { class: "muted" }, r.match || "", r.snippet ? h("span", { class: "mono" }, ": “" + r.snippet + "”") : null)))));
    app.append(h("div", { class: "card scroll" },
      h("p", { class: "muted", "data-testid": "result-count" }, `${res.total.toLocaleString()} feature${res.total === 1 ? "" : "s"}` +
        (res.index_ready === false ? " (text index still building: labels only)" : "")),
      table, pager(p, offset, limit, res.total)));
  }
  function pager(p, offset, limit, total) {
    const go = off => { const n = new URLSearchParams(p); n.set("offset", off); return "#/search?" + n.toString(); };
    return h("div", { class: "pager" },
      offset > 0 ? h("a", { href: go(Math.max(0, offset - limit)) }, "← previous") : null,
      total > limit ? h("span", { class: "muted" }, `${offset + 1}–${Math.min(total, offset + limit)} of ${total}`) : null,
      offset + limit < total ? h("a", { href: go(offset + limit) }, "next →") : null);
  }

  // ---- feature ------------------------------------------------------------------------
  async function pageFeature(id) {
    setNav("search");
    const f = await api("features/" + enc(id));
    app.textContent = "";
    app.append(h("h1", {}, h("span", { class: "mono", "data-testid": "feature-id" }, f.id), " ", badge(f.lineage)),
      h("p", { class: "label", "data-testid": "feature-label" }, f.label || h("span", { class: "muted" }, "no label")),
      h("div", { class: "actions" },
        h("a", { class: "button", href: "#/graph/" + f.id }, "Flow graph"),
        h("a", { class: "button secondary", href: "#/steer?seed=" + encodeURIComponent(f.id) }, "Steer with this feature"),
        f.prev ? h("a", { href: "#/feature/" + f.prev }, "← " + f.prev) : null,
        f.next ? h("a", { href: "#/feature/" + f.next }, f.next + " →") : null));
    const grid = h("div", { class: "grid", style: "margin-top:1rem" });
    app.append(grid);
    if (f.predecessors.length) {
      const th = f.thresholds || {};
      grid.append(h("div", { class: "card" }, h("h2", { style: "margin-top:0" }, "Sources (top-1 cosine)"),
        h("p", { class: "muted", style: "margin:0 0 0.4rem" }, "bold: above the layer's threshold (a high score)"),
        h("table", { "data-testid": "predecessors" },
          h("thead", {}, h("tr", {}, h("th", {}, "score"), h("th", { class: "num" }, "cos"), h("th", { class: "num" }, "threshold"), h("th", {}, "matched feature"), h("th", {}, "label"))),
          h("tbody", {}, f.predecessors.map(p => h("tr", {},
            h("td", {}, `s(${p.kind === "res" ? "R" : p.kind === "mlp" ? "M" : "A"})`),
            h("td", { class: "num", style: p.high ? "font-weight:600" : "" }, fmt(p.cos)),
            h("td", { class: "num muted" }, fmt(th[p.kind])),
            h("td", {}, p.id ? featLink(p.id) : "–"), h("td", { class: "label" }, p.label || "")))))));
    }
    grid.append(h("div", { class: "card" }, h("h2", { style: "margin-top:0" }, "Successors"),
      f.successors.length ? h("table", { "data-testid": "successors" }, h("tbody", {}, f.successors.map(s => h("tr", {},
        h("td", {}, featLink(s.id)), h("td", { class: "num" }, fmt(s.cos)), h("td", {}, badge(s.lineage)), h("td", { class: "label" }, s.label || "")))))
        : h("p", { class: "muted" }, "none in the atlas (last layer, or not a residual feature)")));
    if (f.promoted_tokens && f.promoted_tokens.length)
      app.append(h("div", { class: "card" }, h("h2", { style: "margin-top:0" }, "Top promoted tokens"),
        h("div", { "data-testid": "promoted" }, f.promoted_tokens.map(t => h("span", { class: "chip" }, t)))));
    const ctx = h("div", { class: "card" }, h("h2", { style: "margin-top:0" }, "Top activating contexts"));
    if (f.contexts == null) ctx.append(h("p", { class: "muted" }, "Not computed for this site: run saeflow contexts ATLAS."));
    else if (!f.contexts.length) ctx.append(h("p", { class: "muted" }, "The feature never fired on the corpus sample."));
    else ctx.append(h("ol", { class: "contexts", "data-testid": "contexts" }, f.contexts.map(c => h("li", {},
      h("span", { class: "act" }, fmt(c.activation, 2)), oneLine(c.before), h("mark", {}, oneLine(c.token)), oneLine(c.after)))));
    app.append(ctx);
  }

  // ---- flow graph ---------------------------------------------------------------------
  async function pageGraph(id, q) {
    setNav("graph");
    if (!id) {
      app.textContent = "";
      app.append(h("h1", {}, "Flow graph"), h("p", {}, "Open a feature and press ", h("b", {}, "Flow graph"),
        ", or type a feature id:"), seedForm(v => { location.hash = "#/graph/" + v; }));
      return;
    }
    const p = params(q);
    const gd = (await overview()).graph_defaults;  // the library's defaults (saeflow.flow)
    const rt = p.get("res_threshold") || String(gd.res_threshold);
    const bt = p.get("block_threshold") || String(gd.block_threshold);
    if (state.pickSeed !== id) { state.picked = new Set(); state.pickSeed = id; }
    app.textContent = "";
    const box = h("div", { id: "graph-box" });
    const info = h("span", { class: "muted", "data-testid": "graph-info" });
    const exports = h("div", { class: "exports" }, h("span", { class: "muted" }, "export:"));
    const rIn = h("input", { type: "range", min: 0, max: 1, step: 0.01, value: rt, name: "res_threshold" });
    const bIn = h("input", { type: "range", min: 0, max: 1, step: 0.01, value: bt, name: "block_threshold" });
    const rOut = h("output", {}, fmt(rt, 2)), bOut = h("output", {}, fmt(bt, 2));
    const pickMode = h("input", { type: "checkbox", name: "pick" });
    const belowNull = h("input", { type: "checkbox", name: "below_null", checked: p.get("below_null") === "1" });
    const notes = h("div", { "data-testid": "graph-notes" });
    const chain = P.permutationChain(id, api);
    const pickedList = h("div", { class: "picked-list" });
    app.append(h("h1", {}, "Flow graph of ", featLink(id)),
      h("div", { class: "controls card" },
        h("label", {}, h("span", {}, "residual chain s(R) ≥ ", rOut), rIn),
        h("label", {}, h("span", {}, "MLP / attention ≥ ", bOut), bIn),
        h("label", { style: "flex-direction:row;align-items:center;gap:0.4rem", title: "admit links below their layer's null (chance-level matches)" },
          belowNull, "below null"),
        h("label", { style: "flex-direction:row;align-items:center;gap:0.4rem" }, pickMode, "click picks nodes for steering"),
        info, exports),
      h("p", { class: "muted", style: "margin:0 0 0.4rem" }, "One vocabulary with the lineage classes: a residual link that is high by the atlas's " +
        "threshold is never cut, and a link must beat its layer's null unless “below null” is ticked."),
      notes, D.legend(state.overview ? state.overview.classes : Object.keys(D.COLORS), true), box, chain.element,
      h("h2", {}, "Steer with this graph"), pickedList);
    const steerBox = h("div");
    app.append(steerBox);
    let timer = null;
    const load = async () => {
      const qs = `res_threshold=${rIn.value}&block_threshold=${bIn.value}` + (belowNull.checked ? "&below_null=1" : "");
      history.replaceState(null, "", `#/graph/${id}?${qs}`);
      try {
        const g = await api(`graph/${enc(id)}?${qs}`);
        info.textContent = `${g.nodes.length} nodes, ${g.edges.length} edges` +
          (g.settings && g.settings.truncated ? ` (stopped at ${g.nodes.length} nodes: raise the thresholds)` : "");
        notes.textContent = "";
        if (g.notes && g.notes.length) notes.append(h("div", { class: "card warn" }, g.notes.map(t => h("p", { style: "margin:0.15rem 0" }, "⚠ " + t))));
        chain.update(g.nodes.map(n => n.id));
        const redraw = () => D.drawFlow(box, g, {
          picked: state.picked,
          onClick: (n, ev) => {
            if (pickMode.checked || ev.shiftKey) {
              state.picked.has(n.id) ? state.picked.delete(n.id) : state.picked.add(n.id);
              redraw(); showPicked();
            } else location.hash = "#/feature/" + n.id;
          },
        });
        redraw();
        exports.textContent = ""; exports.append(h("span", { class: "muted" }, "export:"));
        for (const f of g.formats) exports.append(h("a", { href: `/api/export/${enc(id)}?fmt=${f}&${qs}`, download: "", "data-fmt": f }, f));
      } catch (e) { box.textContent = String(e.message || e); }
    };
    const showPicked = () => {
      pickedList.textContent = "";
      if (!state.picked.size) { pickedList.append(h("p", { class: "muted" }, "All graph nodes are used; tick “click picks nodes” (or shift-click) to steer with a subset.")); return; }
      pickedList.append(h("span", { class: "muted" }, "picked: "), [...state.picked].map(x => h("span", { class: "chip" }, x,
        h("button", { type: "button", title: "remove", onclick: () => { state.picked.delete(x); load(); showPicked(); } }, "×"))));
    };
    const onSlide = () => { rOut.textContent = fmt(rIn.value, 2); bOut.textContent = fmt(bIn.value, 2);
      clearTimeout(timer); timer = setTimeout(load, 180); };
    rIn.addEventListener("input", onSlide); bIn.addEventListener("input", onSlide);
    belowNull.addEventListener("change", load);
    showPicked();
    steerPanel(steerBox, { seed: id, picked: () => [...state.picked], thresholds: () => [rIn.value, bIn.value],
      belowNull: () => belowNull.checked });
    await load();
  }
  function seedForm(go) {
    const inp = h("input", { type: "text", name: "seed", placeholder: "12/res/4111", size: 20 });
    const form = h("form", { class: "inline" }, inp, h("button", { type: "submit" }, "Open"));
    form.addEventListener("submit", ev => { ev.preventDefault(); if (inp.value.trim()) go(inp.value.trim()); });
    return form;
  }

  // ---- steering -----------------------------------------------------------------------
  async function pageSteer(q) {
    setNav("steer");
    const p = params(q);
    const o = await overview();
    app.textContent = "";
    app.append(h("h1", {}, "Steering"));
    const seed = p.get("seed");
    const box = h("div");
    app.append(h("div", { class: "card" }, h("p", { class: "muted", style: "margin-top:0" },
      "Steer with the flow graph of a seed feature (all its nodes, or those picked on the graph page)."),
      seedForm(v => { location.hash = "#/steer?seed=" + encodeURIComponent(v); })));
    if (o.steering.available) app.append(themeFinder());
    app.append(box);
    if (seed) {
      const picked = state.pickSeed === seed ? [...state.picked] : [];
      steerPanel(box, { seed, picked: () => picked, thresholds: () => [p.get("res_threshold") || o.graph_defaults.res_threshold,
        p.get("block_threshold") || o.graph_defaults.block_threshold], belowNull: () => p.get("below_null") === "1" });
    }
  }
  function themeFinder() {
    const inp = h("input", { type: "text", name: "description", placeholder: "weddings", size: 24 });
    const status = h("span", { class: "muted", "data-testid": "theme-status" });
    const out = h("div", { "data-testid": "theme-results" });
    const form = h("form", { class: "inline" }, h("label", {}, "or find a theme's features", inp),
      h("button", { type: "submit", class: "secondary" }, "Find"), status);
    form.addEventListener("submit", async ev => {
      ev.preventDefault();
      if (!inp.value.trim()) return;
      out.textContent = ""; status.textContent = "searching…";
      try {
        let j = await api("themes", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ description: inp.value.trim() }) });
        while (j.status !== "done" && j.status !== "error") {
          status.textContent = j.status === "loading" ? "loading the model…" : (j.progress && j.progress.phase) || j.status;
          await new Promise(r => setTimeout(r, 400));
          j = await api("jobs/" + encodeURIComponent(j.id));
        }
        if (j.status === "error") throw new Error(j.error);
        status.textContent = `${j.features.length} features most specific to the theme's text:`;
        out.append(h("table", {}, h("tbody", {}, j.features.map(x => h("tr", {},
          h("td", {}, featLink(x.id)), h("td", { class: "num" }, "t " + fmt(x.score, 1)), h("td", {}, badge(x.lineage)),
          h("td", { class: "label" }, x.label), h("td", {}, h("a", { href: "#/steer?seed=" + encodeURIComponent(x.id) }, "steer")))))));
      } catch (e) { status.textContent = String(e.message || e); }
    });
    return h("div", { class: "card" }, form, out);
  }
  function steerPanel(box, opt) {
    const o = state.overview;
    if (o && !o.steering.available) {
      box.append(h("p", { class: "card muted", "data-testid": "steer-off" }, "Steering is off: " + o.steering.reason));
      return;
    }
    const layerSel = h("select", { name: "layer" }, h("option", { value: "" }, "seed's layer"),
      (o ? o.layers : []).map(l => h("option", { value: l }, l)));
    const field = (label, input) => h("label", {}, label, input);
    const form = h("form", { class: "inline card", "data-testid": "steer-form" },
      h("label", { style: "flex-basis:100%" }, "prompt", h("textarea", { name: "prompt", rows: 2 }, "I think")),
      field("action", h("select", { name: "action" }, h("option", { value: "activate" }, "activate"), h("option", { value: "suppress" }, "suppress"))),
      field("mode", h("select", { name: "mode" }, h("option", { value: "cumulative" }, "cumulative"), h("option", { value: "single" }, "single layer"))),
      field("up to layer", layerSel),
      field("schedule", h("select", { name: "schedule" }, ["constant", "exponential", "linear"].map(s => h("option", { value: s }, s)))),
      field("coefficient s (activate) / r (suppress)", h("input", { type: "number", name: "coefficient", value: 0.2, step: "any", style: "width:7rem" })),
      field("end s (linear)", h("input", { type: "number", name: "end_coefficient", step: "any", placeholder: "–", style: "width:5.5rem" })),
      field("magnitude of v", h("select", { name: "magnitude", title: "res_norm: s is a fraction of the layer's typical residual norm" },
        h("option", { value: "" }, "default (res_norm)"), ["res_norm", "activation", "theta", "none"].map(m => h("option", { value: m }, m)))),
      field("steer tokens", h("select", { name: "window", title: "steering-vectors' min_token_index: which positions are edited" },
        h("option", { value: "all" }, "all (prompt and generated)"), h("option", { value: "generated" }, "generated only"),
        h("option", { value: "from" }, "from position…"))),
      field("from position", h("input", { type: "number", name: "from_token", value: 0, min: 0, style: "width:5rem", disabled: true })),
      field("new tokens", h("input", { type: "number", name: "max_new_tokens", value: 32, min: 1, max: 256, style: "width:5rem" })),
      field("random seed", h("input", { type: "number", name: "random_seed", value: 0, style: "width:5rem" })),
      h("button", { type: "submit" }, "Generate"));
    const bar = h("div", { class: "progress" }, h("div"));
    const status = h("p", { class: "muted", "data-testid": "steer-status" });
    const plain = h("pre", { "data-testid": "unsteered" }), steered = h("pre", { "data-testid": "steered" });
    const planBox = h("div", { class: "muted", "data-testid": "steer-plan" });
    box.append(form, status, bar, h("div", { class: "steer-out" },
      h("div", {}, h("h2", {}, "Unsteered"), plain), h("div", {}, h("h2", {}, "Steered"), steered)), planBox);
    const win = form.querySelector("select[name=window]"), fromTok = form.querySelector("input[name=from_token]");
    win.addEventListener("change", () => { fromTok.disabled = win.value !== "from"; });
    form.addEventListener("submit", async ev => {
      ev.preventDefault();
      const f = new FormData(form);
      const [rt, bt] = opt.thresholds();
      const body = { prompt: f.get("prompt"), seed: opt.seed, features: opt.picked(), action: f.get("action"),
        mode: f.get("mode"), layer: f.get("layer") === "" ? null : +f.get("layer"), schedule: f.get("schedule"),
        coefficient: +f.get("coefficient"),
        end_coefficient: f.get("end_coefficient") === "" ? null : +f.get("end_coefficient"), magnitude: f.get("magnitude") || null, max_new_tokens: +f.get("max_new_tokens"), random_seed: +f.get("random_seed"),
        res_threshold: +rt, block_threshold: +bt, below_null: opt.belowNull ? opt.belowNull() : false,
        generated_only: win.value === "generated", from_token: win.value === "from" ? +fromTok.value : 0 };
      const btn = form.querySelector("button"); btn.disabled = true;
      plain.textContent = ""; steered.textContent = ""; planBox.textContent = ""; status.classList.remove("error");
      try {
        const job = await api("steer", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
        await poll(job.id, { bar, status, plain, steered, planBox });
      } catch (e) { status.textContent = String(e.message || e); status.classList.add("error"); }
      btn.disabled = false;
    });
  }
  async function poll(id, ui) {
    for (;;) {
      const j = await api("jobs/" + encodeURIComponent(id));
      const pr = j.progress || {};
      ui.bar.firstChild.style.width = pr.total ? (100 * pr.done / pr.total).toFixed(0) + "%" : "0";
      ui.status.textContent = { queued: "waiting for the model…", loading: "loading the model (first request)…",
        running: `generating ${pr.phase || ""} ${pr.done || 0}/${pr.total || "?"}`, done: `done in ${fmt(j.elapsed, 1)} s`,
        error: "failed: " + j.error }[j.status] || j.status;
      ui.status.dataset.status = j.status;
      ui.plain.textContent = j.unsteered || ""; ui.steered.textContent = j.steered || "";
      const w = j.window || {};
      if (j.plan && j.plan.length) ui.planBox.textContent = `${j.plan.length} steered features: ` +
        j.plan.map(x => `${x.feature} (${fmt(x.coefficient, 2)})`).join(", ") +
        (w.generated_only ? "; generated tokens only" : w.from_token ? `; tokens from position ${w.from_token}` : "; every token");
      if (j.status === "done" || j.status === "error") { if (j.status === "error") ui.status.classList.add("error"); return j; }
      await new Promise(r => setTimeout(r, 300));
    }
  }

  // ---- router -------------------------------------------------------------------------
  async function route() {
    D.hideTip();
    const raw = location.hash.replace(/^#\/?/, "");
    const [path, q] = raw.split("?");
    const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
    try {
      if (!parts.length) await pageOverview();
      else if (parts[0] === "search") await pageSearch(q);
      else if (parts[0] === "feature") await pageFeature(parts.slice(1).join("/"));
      else if (parts[0] === "graph") await pageGraph(parts.slice(1).join("/"), q);
      else if (parts[0] === "steer") await pageSteer(q);
      else fail(new Error("unknown page " + path));
    } catch (e) { fail(e); }
  }
  document.getElementById("quick-search").addEventListener("submit", ev => {
    ev.preventDefault();
    const v = document.getElementById("quick-q").value.trim();
    if (/^\d+[/-](res|mlp|att|att_z)[/-]\d+$/.test(v)) location.hash = "#/feature/" + v.replace(/-/g, "/");
    else location.hash = "#/search?q=" + encodeURIComponent(v);
  });
  window.addEventListener("hashchange", route);
  overview().then(o => { document.getElementById("suite-name").textContent = `${o.name} · ${o.model || ""}`; }).catch(() => {});
  route();
})();
