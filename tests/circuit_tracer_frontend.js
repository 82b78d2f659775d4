// Runs circuit-tracer's own frontend data code (its util.js and attribution_graph/util-cg.js,
// formatData) on a graph file and prints, for tests/test_neuronpedia.py, what its link graph
// positions from: each node's row (streamIdx), the number of rows the link graph draws
// (init-cg-link-graph.js: the logit node's layer + 2, or 26 + 2 without one), the feature
// titles (init-cg-feature-detail.js) and how many features it dropped as repeated.
//   node tests/circuit_tracer_frontend.js ASSETS_DIR NODE_MODULES_DIR GRAPH.json
// The browser globals it needs are given plain values; d3, d3-collection and d3-jetpack (for
// d3.nestBy) come from npm.
const fs = require('fs'), vm = require('vm'), path = require('path')
const [assets, js, graphFile] = process.argv.slice(2)
globalThis.window = globalThis
globalThis.location = new URL('http://127.0.0.1/index.html')
globalThis.history = {replaceState() {}}
const store = new Map()
globalThis.localStorage = {getItem: k => store.get(k) ?? null, setItem: (k, v) => store.set(k, v),
                           removeItem: k => store.delete(k)}
const logs = []
console.log = (...a) => logs.push(a)
for (const f of [path.join(js, 'd3/dist/d3.min.js'), path.join(js, 'd3-collection/dist/d3-collection.min.js'),
                 path.join(js, 'd3-jetpack/build/d3-jetpack.js'),
                 path.join(assets, 'util.js'), path.join(assets, 'attribution_graph/util-cg.js')])
  vm.runInThisContext(fs.readFileSync(f, 'utf8'), {filename: f})
;(async () => {
  const data = JSON.parse(fs.readFileSync(graphFile, 'utf8'))
  const visState = {pinnedIds: [], hiddenIds: [], graphSchemaVersion: data.metadata.schema_version || 0,
                    pruningThreshold: data.metadata.node_threshold}
  const out = await utilCg.formatData(data, visState)
  const logit = out.byStream.find(d => d[0].feature_type == 'logit')
  const yNumTicks = (logit ? parseInt(logit[0].layer) : 26) + 2  // init-cg-link-graph.js
  const nodes = out.nodes.map(d => ({
    nodeId: d.nodeId, streamIdx: d.streamIdx, ctx_idx: d.ctx_idx, feature_type: d.feature_type,
    title: `${utilCg.layerLocationLabel(d.layer, d.probe_location_idx)}/` +
           (visState.graphSchemaVersion > 0 ? util.cantorUnpair(d.featureIndex)[1] : d.featureIndex),
    clerp: d.clerp}))
  process.stdout.write(JSON.stringify({yNumTicks, nodes, features: out.features.length,
    links: out.links.length, deleted: logs.filter(l => l[0] && l[0].deletedFeatures).length}))
})().catch(e => { process.stderr.write(String(e.stack || e)); process.exit(1) })
