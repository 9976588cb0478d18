"""The main command: `sae-demo` (or `python -m sae_utils demo`, or `bash scripts/demo.sh` on a fresh machine).

Until the toy model ships, it runs notebook 01 end to end (on `tiny`, offline, or on a real model when one is
reachable) and writes the executed notebook to the output folder.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run_notebook(name: str, out: Path, **parameters) -> Path:
    import papermill

    source = NOTEBOOKS / name
    if not source.exists():
        raise FileNotFoundError(f"{source} not found: the demo runs from a clone of the repository.")
    out.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(str(source), str(out / name), parameters=parameters, kernel_name="python3",
                               cwd=str(NOTEBOOKS), progress_bar=False)
    return out / name


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="sae-demo", description=__doc__)
    parser.add_argument("--out", default="outputs/demo", help="output folder")
    parser.add_argument("--model", default="tiny", help="tiny (offline), or a hub id / local folder of SD")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path = run_notebook("01_cross_attention_maps.ipynb", Path(args.out), model=args.model, device=args.device,
                        interactive=False, **({"num_inference_steps": 4} if args.model == "tiny" else {}))
    print(f"executed notebook written to {path} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
