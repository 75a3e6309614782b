#!/usr/bin/env bash
# Set up llmkit in .venv, pull the default model, and generate an answer with it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/llmkit pull smollm2-135m-instruct
.venv/bin/llmkit generate -m smollm2-135m-instruct "The capital of France is" --max-tokens 20 --temperature 0
