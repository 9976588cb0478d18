#!/usr/bin/env bash
# The main command: set up (if needed), then run the demo on the embedded default. Options go to sae-demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
python -m sae_utils.demo "$@"
