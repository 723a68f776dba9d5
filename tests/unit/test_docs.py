"""The README and docs/ stay inside the repository: every link resolves to a file here."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_the_three_pages_exist():
    names = {p.name for p in PAGES}
    assert {"contract.md", "user-guide.md", "operations.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_stays_in_the_repository(page):
    for target in LINK.findall(page.read_text()):
        if target.startswith("#"):
            continue
        assert "://" not in target, f"{page.name} links outside the repository: {target}"
        path = (page.parent / target.split("#", 1)[0]).resolve()
        assert path.is_relative_to(ROOT), f"{page.name}: {target} leaves the repository"
        assert path.exists(), f"{page.name}: {target} does not exist"


def test_the_readme_names_no_file_outside_the_repository():
    text = (ROOT / "README.md").read_text()
    assert "RESIZE.md" not in text and "REALITY.md" not in text and "../shared" not in text
