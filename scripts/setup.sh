#!/usr/bin/env bash
# Set up a virtual environment in .venv with sae_utils and its test/notebook extras.
# Idempotent: re-running it only installs what is missing. Keeps an existing torch (a GPU build, say);
# on a machine without torch it installs the CPU build pinned in scripts/constraints-cpu.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
pip_install() { python -m pip install --quiet --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored" || true; }
if ! python -c "import torch" 2>/dev/null; then
  pip_install -r scripts/constraints-cpu.txt
fi
# Pin whatever torch is now installed, so that no dependency drags in another (multi-GB CUDA) build.
constraints=$(mktemp)
python -c "from importlib.metadata import version; print('torch==' + version('torch').split('+')[0])" > "$constraints"
pip_install -c "$constraints" -e ".[test,notebooks,eval]"
# Tests only: one test checks the CLIP templates against open_clip's copy (its dependencies would pull
# torchvision, hence --no-deps).
pip_install --no-deps open-clip-torch
rm -f "$constraints"
python -c "import sae_utils, torch, diffusers, transformers; print(f'sae_utils ready: torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}')"
