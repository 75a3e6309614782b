#!/usr/bin/env bash
# Create .venv at the repository root and install llmkit into it (editable).
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# Pin torch first: on CPU machines this resolves to the CPU build instead of a multi-GB CUDA one.
.venv/bin/python -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
if [ -n "$extras" ]; then
    pip install -e ".[$extras]"
else
    pip install -e .
fi
.venv/bin/python -c "import llmkit, torch; print('llmkit', llmkit.__version__, 'with torch', torch.__version__)"
