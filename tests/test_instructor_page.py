"""notebooks/README.md, the instructor's page: every notebook has its row and its section, README links it, and
every time it gives says whether it was measured or is an estimate."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "notebooks" / "README.md"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_every_notebook_has_its_row_and_its_section():
    page = PAGE.read_text()
    for path in NOTEBOOKS:
        number = path.name[:2]
        assert f"]({path.name})" in page, f"the at-a-glance table does not link {path.name}"
        assert re.search(rf"^### {number} · ", page, re.M), f"no '### {number} · ...' section for {path.name}"
    assert "](notebooks/README.md)" in (ROOT / "README.md").read_text(), "README.md does not link the page"


def test_every_time_in_the_table_is_labelled_measured_or_estimate():
    table = PAGE.read_text().split("## At a glance", 1)[1].split("\n\n", 2)[1]
    rows = [line for line in table.splitlines() if line.startswith("| [")]
    assert len(rows) == len(NOTEBOOKS)
    for row in rows:
        for cell in row.split("|")[2:4]:  # CPU laptop, T4
            if re.search(r"\d+ (s|min)\b", cell):
                assert "estimate" in cell or "measured" in cell, f"a time without its label: {cell.strip()!r}"


def test_the_links_point_at_files_that_exist():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", PAGE.read_text()):
        if not target.startswith("http"):
            assert (PAGE.parent / target).exists(), f"notebooks/README.md links {target}, which does not exist"
