#!/usr/bin/env bash
# The course command: set up (if needed), then JupyterLab on notebooks/, with this project's .venv as the
# notebooks' kernel. Options go to `jupyter lab` (e.g. --no-browser --port 8899).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# The notebooks ask for the kernel "python3": make it this environment's Python, even where the user has
# another "python3" kernel of their own (JUPYTER_PATH is searched before the user's folders).
python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (sae_utils .venv)" >/dev/null
export JUPYTER_PATH="$PWD/.venv/share/jupyter${JUPYTER_PATH:+:$JUPYTER_PATH}"
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
# as root (a container, a CI machine) Jupyter refuses to start unless told
[ "$(id -u)" != 0 ] || set -- --allow-root "$@"
exec python -m jupyterlab --ServerApp.root_dir="$PWD/notebooks" "$@"
