#!/usr/bin/env bash
# The peer libraries for tests/test_peers.py, each in its own virtual environment so saeflow's
# .venv stays small (safe to re-run), and Graphviz for the DOT test. Called by
# `bash scripts/setup.sh --test`.
#   .venv-peers   sae-lens 6, eai-sparsify, dictionary-learning (and jsonschema, for the
#                 Neuronpedia graph schema test)
#   .venv-peers5  sae-lens 5 (the pre-6 file layout; it needs transformers 4 and numpy 1)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv-peers/bin/python ] || "$PY" -m venv .venv-peers
[ -x .venv-peers5/bin/python ] || "$PY" -m venv .venv-peers5
# The two environments install side by side (each is one background job; both must succeed).
# torch is pinned in the same call as everything that depends on it, so nothing pulls a CUDA build.
# pyarrow 21+ needs numpy 2, which sae-lens 5 does not allow.
.venv-peers5/bin/pip --disable-pip-version-check -q install "torch==2.13.0" "sae-lens==5.11.0" \
  "pyarrow<21" &
peers5=$!
.venv-peers/bin/pip --disable-pip-version-check -q install "torch==2.13.0" "sae-lens==6.54.12" \
  "eai-sparsify==1.3.3" "dictionary-learning==0.1.0" "jsonschema==4.26.0"
# nnsight (a dictionary-learning dependency) pulls a torchvision built for another torch, which
# breaks `import transformers`; nothing the tests run needs torchvision.
.venv-peers/bin/pip --disable-pip-version-check -q uninstall -y torchvision 2>/dev/null || true
# circuit-tracer's frontend files and its server (its Python dependencies are not needed), and
# the npm packages its page loads from CDNs, for tests/test_neuronpedia.py (its data code under
# node) and tests/test_circuit_tracer_browser.py (the page in Chromium, the CDN URLs answered
# from here): d3 7 and d3-jetpack (+ d3-collection) for its d3.js and jetpack_2024-07-20.js, and
# the exact dagre@0.8.5 and pako@2.1.0 its index.html names.
.venv-peers/bin/pip --disable-pip-version-check -q install --no-deps "circuit-tracer==0.5.0"
if command -v npm >/dev/null 2>&1; then
  npm install --silent --no-audit --no-fund --save-exact --prefix .venv-peers/js d3@7.9.2 d3-collection@1.0.7 \
    d3-jetpack@2.1.0 dagre@0.8.5 pako@2.1.0
else
  echo "setup: npm is missing; the circuit-tracer frontend checks (node and browser) will be" \
    "skipped" >&2
fi
wait "$peers5" || { echo "setup: installing sae-lens 5 into .venv-peers5 failed" >&2; exit 1; }
# Graphviz's dot, which tests/test_export.py uses to parse the DOT export.
if ! command -v dot >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends graphviz >/dev/null) \
      || echo "setup: could not install graphviz; the DOT parse test will be skipped" >&2
  else
    echo "setup: install Debian's graphviz (sudo apt-get install graphviz) for the DOT test" >&2
  fi
fi
