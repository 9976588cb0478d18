"""Colab's door: a notebook's set-up cell on a fresh runtime installs the course from its repository, then the
notebook runs.

A fresh Colab runtime is simulated by a clean virtual environment that has only torch and numpy (Colab ships
both) and ipykernel (it is the notebook's kernel), with a stand-in `google.colab` module imported at start-up, as
Colab's kernel has it. (numpy must be there before the parameters cell imports torch: a torch imported without
numpy keeps "Numpy is not available" for the session, even after pip installs numpy, as this test first found.)
Notebook 01 runs there with papermill, in an empty folder (Colab's /content: no checkout), with its set-up cell's
REPO_URL pointed at a local `file://` clone of this repository (its tracked and untracked files as they are now,
committed). The set-up cell must pip-install sae_utils from that clone, and every following cell must then run
on "tiny".
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from importlib.metadata import distribution
from pathlib import Path

import pytest

from test_notebooks import CI_PARAMETERS, CI_PARAMETERS_PER_NOTEBOOK

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "01_cross_attention_maps.ipynb"
STUB = '"""A stand-in for Colab\'s google.colab (tests/test_colab_setup.py): its presence is what says Colab."""\n'


def run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{command} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def clone_of_this_checkout(target: Path) -> str:
    """A git repository with this checkout's files as they are (tracked and untracked, not ignored), committed."""
    files = run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT).split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    identity = ["-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    run(["git", "init", "-q", "-b", "main"], cwd=target)
    run(["git", "add", "-A"], cwd=target)
    run(["git", *identity, "commit", "-q", "-m", "snapshot for tests/test_colab_setup.py"], cwd=target)
    return run(["git", "rev-parse", "HEAD"], cwd=target).strip()


def with_dependencies(name: str) -> set[str]:
    """`name` and what it needs (not its extras), as installed in this environment."""
    found, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current.lower() not in found:
            found.add(current.lower())
            todo += [re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0] for r in distribution(current).requires or []
                     if "extra ==" not in r]
    return found


def link_installed(names: set[str], site: Path) -> None:
    """Put the installed files of `names` (this environment's) into `site`, as hard links where the disk allows.

    pip never rewrites an installed file in place (it removes it and writes a new one), so a pip in the runtime
    cannot change this environment through a link. Much faster than installing torch's 750 MB again."""
    for name in names:
        dist = distribution(name)
        for file in dist.files or []:
            source = Path(dist.locate_file(file))
            if file.parts[0] == ".." or not source.is_file():
                continue  # scripts in bin/ and the like: the runtime does not run them
            target = site / file
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError:  # another disk
                shutil.copy2(source, target)


def fresh_runtime(venv: Path) -> Path:
    """A clean venv with only torch (this machine's pinned build, and what it needs), numpy and ipykernel, and
    google.colab imported at start."""
    run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    link_installed(with_dependencies("torch") - {"setuptools", "pip"}, site)  # the venv has its own setuptools
    run([str(python), "-m", "pip", "install", "-q", "--no-compile", "numpy", "ipykernel"])
    (site / "google" / "colab").mkdir(parents=True)  # no google/__init__.py: a namespace package, as on Colab
    (site / "google" / "colab" / "__init__.py").write_text(STUB)
    (site / "colab_stub.pth").write_text("import google.colab\n")
    return python


@pytest.mark.slow
def test_the_colab_setup_cell_installs_the_course_and_notebook_01_runs(tmp_path, capsys):
    clone = tmp_path / "separate-and-enhance"
    clone.mkdir()
    commit = clone_of_this_checkout(clone)
    started = time.monotonic()
    python = fresh_runtime(tmp_path / "runtime")
    runtime_seconds = time.monotonic() - started
    probe = ("import importlib.util as u, sys; print([m for m in ('sae_utils', 'diffusers', 'transformers', "
             "'torch') if u.find_spec(m)], 'google.colab' in sys.modules)")
    assert run([str(python), "-c", probe], cwd=tmp_path).strip() == "['torch'] True", (
        "the runtime should have torch, and none of what the set-up cell installs")

    # the notebook as Colab opens it, its set-up cell pointed at the clone (a fork would use set_repo_url.py)
    content = tmp_path / "content"
    content.mkdir()
    notebook = json.loads(NOTEBOOK.read_text())
    setup = [c for c in notebook["cells"] if c["cell_type"] == "code"][1]
    text, found = re.subn(r'^REPO_URL = "[^"]*"', f'REPO_URL = "file://{clone}"', "".join(setup["source"]), flags=re.M)
    assert found == 1, "the set-up cell should assign REPO_URL once, on its own line"
    setup["source"] = text.splitlines(keepends=True)
    (content / NOTEBOOK.name).write_text(json.dumps(notebook))

    kernels = tmp_path / "jupyter" / "kernels" / "colab"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "a fresh Colab runtime (simulated)", "language": "python"}))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # PIP_COMPILE=false: the set-up cell's pip skips byte-compiling the ~7,800 .py files it installs (transformers
    # alone is thousands; ~28 s of one core here), as the runtime's own pip install does above; Python compiles
    # the few modules the notebook imports as it imports them. What is installed, and from where, is unchanged.
    env.update(JUPYTER_PATH=str(tmp_path / "jupyter"), JUPYTER_CONFIG_DIR=str(tmp_path / "jupyter-config"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "jupyter-runtime"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PIP_COMPILE="false",
               PATH=os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(str(ROOT))))
    parameters = {**CI_PARAMETERS, **CI_PARAMETERS_PER_NOTEBOOK[NOTEBOOK.stem]}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "papermill", NOTEBOOK.name, str(tmp_path / "executed.ipynb"),
                             "-k", "colab", "--cwd", str(content), "-y", json.dumps(parameters), "--no-progress-bar",
                             "--start-timeout", "600"],  # a loaded machine: the kernel's first imports are slow
                            cwd=content, env=env, capture_output=True, text=True)
    notebook_seconds = time.monotonic() - started
    assert result.returncode == 0, f"notebook 01 failed on the simulated Colab runtime:\n{result.stderr[-4000:]}"

    # sae_utils came from the clone, at its commit, by the set-up cell: not from this checkout
    installed = json.loads(run([str(python), "-c", "from importlib.metadata import distribution; "
                                "print(distribution('sae_utils').read_text('direct_url.json'))"], cwd=tmp_path))
    assert installed["url"] == f"file://{clone}" and installed["vcs_info"]["commit_id"] == commit, installed
    location = run([str(python), "-c", "import sae_utils; print(sae_utils.__file__)"], cwd=tmp_path).strip()
    assert location.startswith(str(tmp_path / "runtime")), f"sae_utils was imported from {location}"
    executed = json.loads((tmp_path / "executed.ipynb").read_text())
    code = [c for c in executed["cells"] if c["cell_type"] == "code"]
    assert all(c.get("execution_count") for c in code), "every code cell should have run"
    assert sum("image/png" in o.get("data", {}) for c in code for o in c["outputs"]) >= 5, "the figures are missing"
    with capsys.disabled():
        print(f"\n[colab] fresh runtime (torch, numpy, ipykernel) in {runtime_seconds:.0f} s; notebook 01 with its set-up "
              f"cell (pip install git+file://...) in {notebook_seconds:.0f} s; sae_utils {commit[:10]} from the clone")
