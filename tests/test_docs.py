"""The README and the pages in docs/: every relative link reaches a file (and a heading, where it names one), and
every page is reachable from the README."""
import re

import pytest

from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "conf" / "local" / "README.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page) -> set[str]:
    return {anchor(line.lstrip("#")) for line in page.read_text().splitlines() if line.startswith("#")}


def relative_links(page):
    return [link for link in LINK.findall(page.read_text()) if not link.startswith(("http://", "https://", "mailto:"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_reaches_its_file_and_heading(page):
    broken = []
    for link in relative_links(page):
        path, _, fragment = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists() or (fragment and target.suffix == ".md" and fragment not in anchors(target)):
            broken.append(link)
    assert broken == []


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / link.partition("#")[0]).resolve() for link in relative_links(ROOT / "README.md")}
    assert [p.name for p in (ROOT / "docs").glob("*.md") if p.resolve() not in linked] == []


def test_the_readme_starts_with_the_two_commands_and_stays_one_screen_deep():
    text = (ROOT / "README.md").read_text()
    assert text.index("## Two commands for a fresh machine") < text.index("## Quick start") < text.index("## Extending")
    assert "pip install torch==2.14.1 torchvision==0.29.1 -e '.[test,tune,reports]' && .venv/bin/python -m pytest -q" in text
    assert len(text.splitlines()) < 150
