#!/usr/bin/env bash
# Set up .venv with the test extras and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# The chat-page test drives Debian's chromium through Playwright (never a browser Playwright downloads).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
    sudo=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && sudo="sudo -n"
    { $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium >/dev/null; } \
        || echo "note: could not install chromium; the chat-page browser test will be skipped" >&2
fi
# llama-cpp-python only as a ready wheel (building it takes ~13 minutes): from pip's index or a
# wheel kept in ~/.cache/llmkit/wheels; without it the llama.cpp tests skip.
.venv/bin/python -m pip install -q --only-binary=:all: --find-links "$HOME/.cache/llmkit/wheels" \
    llama-cpp-python 2>/dev/null || echo "note: llama-cpp-python not installed; its tests will be skipped" >&2
exec .venv/bin/python -m pytest -q "$@"
