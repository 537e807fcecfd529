#!/usr/bin/env bash
# The main job: set up, quantize SmolLM2-135M with RTN and AWQ (W3, group 64), and print
# FP / RTN / AWQ perplexity on Pride and Prejudice and on held-out Python docs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/edgequant compare smollm2-135m --methods rtn,awq --w-bits 3 --group-size 64 \
  --ppl austen,pydocs --max-windows 8 "$@"
