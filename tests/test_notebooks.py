"""Every notebook executes end to end with papermill (small sizes), and is stored clean.

Most run on "tiny" (Stable Diffusion's layout: the code paths of the real model); 00 and 04 run on the shipped
"toy" model, where the samples, the base rates and the exact metric of every method mean something.
"""
import json
from pathlib import Path

import papermill
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
COLAB = "https://colab.research.google.com/github/"

# What CI passes to every notebook, then per notebook: small sizes so the whole set runs in minutes.
CI_PARAMETERS = {"model": "tiny", "device": "cpu", "interactive": False}
CI_PARAMETERS_PER_NOTEBOOK = {
    "00_toy_world": {"model": "toy", "images_per_prompt": 1},
    "01_cross_attention_maps": {"num_inference_steps": 4, "premise_images_per_pair": 2},
    "02_separate_and_enhance_losses": {"num_inference_steps": 4, "use_reference_solution": True},
    "03_finetune": {"num_inference_steps": 4, "steps": 6},
    "04_evaluate": {"model": "toy", "num_prompts": 2, "seeds_per_prompt": 2, "finetune_steps": 20},
    "05_multi_concept": {"num_inference_steps": 2, "steps": 3, "num_concepts": 6, "prompts_per_category": 1,
                         "seeds_per_prompt": 2},
}


def cells(path):
    return json.loads(path.read_text())["cells"]


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    dirty = [i for i, c in enumerate(cells(path))
             if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_badge_parameters_and_setup(path):
    all_cells = cells(path)
    code = [c for c in all_cells if c["cell_type"] == "code"]
    assert "parameters" in code[0].get("metadata", {}).get("tags", []), "the first code cell must be tagged 'parameters'"
    parameters = "".join(code[0]["source"])
    for name in ("model", "device", "seed"):
        assert f"{name} =" in parameters, f"the parameters cell must define `{name}`"
    assert "REPO_URL" in "".join(code[1]["source"]), "the second code cell must be the Colab set-up cell"
    badge = "".join(all_cells[0]["source"])
    assert COLAB in badge and path.name in badge, "the first cell must carry a Colab badge for this notebook"


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, monkeypatch):
    # one thread per kernel: tiny's kernels are small, and on a shared CPU extra threads mostly wait
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    parameters = {**CI_PARAMETERS, **CI_PARAMETERS_PER_NOTEBOOK.get(path.stem, {})}
    papermill.execute_notebook(str(path), str(tmp_path / path.name), parameters=parameters, kernel_name="python3",
                               cwd=str(NOTEBOOK_DIR), progress_bar=False)
