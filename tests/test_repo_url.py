"""The repository URL lives in pyproject.toml; scripts/set_repo_url.py writes every other copy (the notebooks' Colab
set-up cells and badges, README's badges, sae_utils.REPO_URL). Publishing a fork is one command."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("set_repo_url", ROOT / "scripts" / "set_repo_url.py")
set_repo_url = importlib.util.module_from_spec(spec)
spec.loader.exec_module(set_repo_url)

FORK = "https://github.com/a-teacher/sepen-fork"


def copy_of_the_named_files(target: Path) -> Path:
    for name in ("pyproject.toml", "README.md", "sae_utils/__init__.py"):
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, target / name)
    shutil.copytree(ROOT / "notebooks", target / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    return target


def test_every_copy_of_the_repository_url_agrees_with_pyproject():
    assert set_repo_url.problems(ROOT) == [], "run: python scripts/set_repo_url.py"
    import sae_utils

    assert sae_utils.REPO_URL == set_repo_url.read_url(ROOT)


def test_publishing_a_fork_rewrites_the_setup_cells_and_the_badges(tmp_path):
    root = copy_of_the_named_files(tmp_path)
    old = set_repo_url.read_url(root)
    before = {p.name: json.loads(p.read_text()) for p in set_repo_url.notebooks(root)}
    assert set_repo_url.main([FORK, "--root", str(root)]) == 0

    assert set_repo_url.read_url(root) == FORK and set_repo_url.problems(root) == []
    old_path = old.removeprefix("https://github.com/")
    for path in [*root.rglob("*.ipynb"), root / "README.md", root / "pyproject.toml", root / "sae_utils/__init__.py"]:
        assert old_path not in path.read_text(), f"{path.name} still names {old}"
    readme = (root / "README.md").read_text()
    for path in set_repo_url.notebooks(root):
        notebook = json.loads(path.read_text())  # still a notebook
        link = f"https://colab.research.google.com/github/a-teacher/sepen-fork/blob/main/notebooks/{path.name}"
        assert link in "".join(notebook["cells"][0]["source"]) and link in readme
        setup = [c for c in notebook["cells"] if c["cell_type"] == "code"][1]
        assert f'REPO_URL = "{FORK}"' in "".join(setup["source"])
        # nothing else changed: putting the old URL back gives the notebook as it was
        assert json.loads(path.read_text().replace("a-teacher/sepen-fork", old_path)) == before[path.name]
    assert set_repo_url.main([FORK, "--root", str(root)]) == 0  # a second run changes nothing
    assert set_repo_url.rewrite(root, FORK) == {}


def test_check_names_a_copy_that_disagrees(tmp_path, capsys):
    root = copy_of_the_named_files(tmp_path)
    readme = root / "README.md"
    readme.write_text(readme.read_text().replace("github/sepen-course/", "github/someone-else/", 1))
    assert set_repo_url.main(["--check", "--root", str(root)]) == 1
    assert "README.md" in capsys.readouterr().err


@pytest.mark.parametrize("url", ["file:///tmp/clone", "https://gitlab.com/a/b", "github.com/a/b"])
def test_only_a_github_url_can_be_published(url, tmp_path):
    root = copy_of_the_named_files(tmp_path)
    with pytest.raises(SystemExit) as exit:
        set_repo_url.main([url, "--root", str(root)])
    assert exit.value.code == 2 and set_repo_url.rewrite(root, set_repo_url.read_url(root)) == {}
