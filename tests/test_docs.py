"""README.md and docs/*.md: every relative link resolves to a file inside the repository, and every #anchor
to a heading of the page it names (GitHub's heading ids)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# [text](target) and ![alt](target); the target ends at the first space or closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
EXTERNAL = ("http://", "https://", "mailto:")


def prose_lines(page: Path) -> list[str]:
    """The page's lines outside fenced code blocks (a link-like text in code is not a link)."""
    lines, fenced = [], False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def heading_ids(page: Path) -> set[str]:
    """GitHub's ids of the page's headings: lower case, punctuation dropped, spaces to hyphens, -1, -2 on repeats."""
    ids: set[str] = set()
    for line in prose_lines(page):
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
        candidate, repeat = slug, 0
        while candidate in ids:
            repeat += 1
            candidate = f"{slug}-{repeat}"
        ids.add(candidate)
    return ids


def links(page: Path) -> list[str]:
    found = []
    for line in prose_lines(page):
        without_code = re.sub(r"`[^`]*`", "", line)
        found += [target for target in LINK.findall(without_code) if not target.startswith(EXTERNAL)]
    return found


def test_the_heading_ids_follow_github(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Results of `x`\n## The CPU demo (`python -m agw_light.train`)\n## Re-ranking\n## Re-ranking\n")
    assert heading_ids(page) == {"results-of-x", "the-cpu-demo-python--m-agw_lighttrain", "re-ranking", "re-ranking-1"}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_relative_link_resolves_inside_the_repository(page):
    broken = []
    for target in links(page):
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.is_relative_to(REPO):
            broken.append(f"{target}: outside the repository")
        elif not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in heading_ids(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(REPO)}")
    assert broken == []


def test_the_readme_links_every_docs_page():
    linked = {(REPO / target.partition("#")[0]).resolve() for target in links(REPO / "README.md")}
    assert [page.name for page in PAGES[1:] if page not in linked] == []
