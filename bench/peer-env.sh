#!/usr/bin/env bash
# Set up the peer environment for `llmkit bench --peer-python`: a separate virtualenv holding
# transformers and llama-cpp-python, so that llmkit's own environment stays a plain install.
#
#   bench/peer-env.sh [VENV_DIR]          (default: /work/peer)
#   llmkit bench --peer-python VENV_DIR/bin/python
#
# llama-cpp-python has no wheel on PyPI: it is compiled from source once (long on a small
# machine) and the wheel is kept in ~/.cache/llmkit/wheels, so later set-ups reuse it.
# Set LLAMA_CPP_WHEEL_DIR to use another wheel folder.
set -euo pipefail

VENV="${1:-/work/peer}"
WHEELS="${LLAMA_CPP_WHEEL_DIR:-$HOME/.cache/llmkit/wheels}"
LLAMA_CPP_VERSION="0.3.36"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/pip" install --upgrade pip
# torch pinned: this version resolves to a CPU build; a bare `torch` pulls a CUDA build of several GB.
"$VENV/bin/pip" install "torch==2.13.0" transformers accelerate gguf numpy

mkdir -p "$WHEELS"
if ! ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $LLAMA_CPP_VERSION from source into $WHEELS (this takes a while) ..."
    "$VENV/bin/pip" wheel --no-deps "llama-cpp-python==$LLAMA_CPP_VERSION" -w "$WHEELS"
fi
# its own dependencies (numpy, jinja2, diskcache, typing-extensions) come from PyPI as wheels
"$VENV/bin/pip" install --find-links "$WHEELS" "llama-cpp-python==$LLAMA_CPP_VERSION"

"$VENV/bin/python" - <<'PY'
import llama_cpp, transformers, torch, gguf
print("peer environment ready:", "llama-cpp-python", llama_cpp.__version__,
      "| transformers", transformers.__version__, "| torch", torch.__version__)
PY
echo "use: llmkit bench --peer-python $VENV/bin/python"
