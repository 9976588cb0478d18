#!/usr/bin/env python3
"""The course repository's URL, in one place: pyproject.toml's [project.urls] Repository.

Everything else that names the repository is written from it by this script: each notebook's Colab set-up cell
(`REPO_URL = "..."`, what `pip install git+...` installs on Colab), each notebook's Colab badge, the badges in
README.md's course table, and `sae_utils.REPO_URL`.

    python scripts/set_repo_url.py https://github.com/you/your-fork   # publish a fork: write the URL everywhere
    python scripts/set_repo_url.py                                    # rewrite every copy from pyproject.toml
    python scripts/set_repo_url.py --check                            # exit 1 if any copy disagrees (a test runs it)

The badges open the notebooks of the `main` branch on Colab, so publish from a fork's `main`.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

BRANCH = "main"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
GITHUB = re.compile(r"https://github\.com/([A-Za-z0-9][A-Za-z0-9-]*)/([A-Za-z0-9._-]+)")
# pyproject.toml: the one place
PYPROJECT_URL = re.compile(r'^(Repository = ")([^"]*)(")$', re.M)
# a notebook's set-up cell, as stored in the .ipynb (a JSON string, so the quotes are escaped)
SETUP_CELL_URL = re.compile(r'(REPO_URL = \\")([^\\"]*)(\\")')
PACKAGE_URL = re.compile(r'^(REPO_URL = ")([^"]*)(")$', re.M)
# any Colab badge link: the part between .../github/ and /notebooks/<file>
BADGE_LINK = re.compile(r"(https://colab\.research\.google\.com/github/)([^)\s\"]*?)(/notebooks/([0-9][0-9]_[\w.-]+\.ipynb))")


def notebooks(root: Path) -> list[Path]:
    return sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def read_url(root: Path) -> str:
    found = PYPROJECT_URL.findall((root / "pyproject.toml").read_text())
    if len(found) != 1:
        sys.exit(f"pyproject.toml should have one `Repository = \"...\"` line under [project.urls], found {len(found)}")
    return found[0][1]


def colab_path(url: str) -> str:
    """owner/name/blob/main, the part of a Colab badge link between github/ and /notebooks/."""
    match = GITHUB.fullmatch(url.rstrip("/").removesuffix(".git"))
    if not match:
        raise ValueError(f"{url!r} is not a GitHub repository URL (https://github.com/OWNER/NAME): Colab opens "
                         "notebooks from GitHub")
    return f"{match[1]}/{match[2]}/blob/{BRANCH}"


def badge(url: str, notebook: str) -> str:
    return f"[![Open In Colab]({BADGE_IMAGE})](https://colab.research.google.com/github/{colab_path(url)}/notebooks/{notebook})"


def rewrite(root: Path, url: str) -> dict[Path, str]:
    """{file: its text with every copy of the repository URL set to `url`} for the files that change."""
    colab = colab_path(url)
    plain = url.rstrip("/").removesuffix(".git")
    changed = {}

    def put(path: Path, text: str) -> None:
        if text != path.read_text():
            changed[path] = text

    pyproject = root / "pyproject.toml"
    put(pyproject, PYPROJECT_URL.sub(lambda m: m[1] + plain + m[3], pyproject.read_text()))
    package = root / "sae_utils" / "__init__.py"
    put(package, PACKAGE_URL.sub(lambda m: m[1] + plain + m[3], package.read_text()))
    for path in [root / "README.md", *notebooks(root)]:
        text = BADGE_LINK.sub(lambda m: m[1] + colab + m[3], path.read_text())
        if path.suffix == ".ipynb":
            text = SETUP_CELL_URL.sub(lambda m: m[1] + plain + m[3], text)
        put(path, text)
    return changed


def problems(root: Path) -> list[str]:
    """What disagrees with pyproject.toml's URL, or is missing (a notebook without its badge or set-up URL)."""
    url = read_url(root)
    found = [f"{path.relative_to(root)} names another repository URL" for path in rewrite(root, url)]
    readme = (root / "README.md").read_text()
    for path in notebooks(root):
        text = path.read_text()
        if len(SETUP_CELL_URL.findall(text)) != 1:
            found.append(f"{path.relative_to(root)}: no (or more than one) `REPO_URL = \"...\"` in its set-up cell")
        wanted = badge(url, path.name).replace('"', '\\"')
        if wanted not in text:
            found.append(f"{path.relative_to(root)}: its Colab badge is not {badge(url, path.name)}")
        if badge(url, path.name) not in readme:
            found.append(f"README.md: no Colab badge for {path.name}")
    if len(PACKAGE_URL.findall((root / "sae_utils" / "__init__.py").read_text())) != 1:
        found.append("sae_utils/__init__.py: no `REPO_URL = \"...\"` line")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", nargs="?", help="https://github.com/OWNER/NAME (default: pyproject.toml's)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a copy disagrees")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.check:
        found = problems(args.root)
        for line in found:
            print(line, file=sys.stderr)
        return 1 if found else 0
    url = args.url or read_url(args.root)
    try:
        colab_path(url)
    except ValueError as error:
        parser.error(str(error))
    for path, text in rewrite(args.root, url).items():
        path.write_text(text)
        print(f"wrote {path.relative_to(args.root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
