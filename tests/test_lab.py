"""`bash scripts/lab.sh`, the README's third command: JupyterLab on notebooks/, the kernel from .venv.

The test runs the command as a learner would (set-up included), headless on a free port with a token, and asks
the server what a browser would get: the notebooks, the kernel, the widgets frontend.
"""
import json
import os
import re
from importlib.metadata import requires, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from lab_server import LabServer

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.slow
def test_lab_sh_serves_the_notebooks_with_the_project_kernel(tmp_path):
    with LabServer(["bash", "scripts/lab.sh"], home=tmp_path, cwd=ROOT).start(timeout=900) as lab:
        listed = {item["name"] for item in lab.get("/api/contents")["content"]}
        assert set(NOTEBOOKS) <= listed, f"JupyterLab should open on notebooks/, but its root lists {sorted(listed)}"

        specs = lab.get("/api/kernelspecs")
        python = specs["kernelspecs"]["python3"]["spec"]["argv"][0]
        assert os.path.abspath(python) == str(ROOT / ".venv" / "bin" / "python"), (
            f"the notebooks' kernel 'python3' runs {python}, not the project's .venv")

        page = lab.get("/lab", raw=True)
        config = json.loads(re.search(r'<script id="jupyter-config-data" type="application/json">(.*?)</script>',
                                      page, re.S).group(1))
        frontends = {e["name"] for e in config["federated_extensions"]}
        assert "@jupyter-widgets/jupyterlab-manager" in frontends, (
            f"JupyterLab serves no widgets frontend (extensions: {sorted(frontends)}): the sliders would not render")


def test_the_widgets_frontend_matches_ipywidgets():
    """ipywidgets names the jupyterlab_widgets it works with; the installed one must be that one."""
    wanted = [Requirement(r) for r in requires("ipywidgets") if r.startswith("jupyterlab_widgets")]
    assert wanted, "ipywidgets declares no jupyterlab_widgets requirement: is it ipywidgets 8?"
    assert version("jupyterlab_widgets") in wanted[0].specifier, (
        f"jupyterlab_widgets {version('jupyterlab_widgets')} does not match ipywidgets {version('ipywidgets')} "
        f"(which wants {wanted[0]}): run bash scripts/setup.sh")


def test_the_notebooks_extra_and_environment_yml_install_jupyterlab():
    notebooks_extra = re.search(r"^notebooks = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    environment = (ROOT / "environment.yml").read_text()
    for pin in ("jupyterlab>=4,<5", "ipywidgets>=8,<9", "jupyterlab_widgets>=3,<4"):
        assert f'"{pin}"' in notebooks_extra, f"the notebooks extra lacks {pin}"
        assert f"- {pin}" in environment, f"environment.yml lacks {pin}"
    assert "[notebooks" in environment


def test_readme_names_the_three_commands():
    readme = (ROOT / "README.md").read_text()
    for command in ("bash scripts/demo.sh", "bash scripts/test.sh", "bash scripts/lab.sh"):
        assert command in readme, f"README.md does not name `{command}`"
